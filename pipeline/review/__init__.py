"""The reviewers' web page (``genpipe review serve``): a FastAPI app with server-rendered HTML, no front-end build.

Modules, each with one entry point:
    app       ``create_app(db_url)``: the routes (queue, item, review, bulk, jobs, images, sign-in, API)
    auth      who is asking (session cookie or bearer token, looked up in the audit DB each request) and CSRF
    views     what the pages show: queue filters and page query, an item with its history, job overviews
    cli       ``genpipe review serve | add-reviewer | update-reviewer``
    templates Jinja2 pages (autoescaped); static/ the one small script (select all, reason lists)
"""

from pipeline.review.app import create_app

__all__ = ["create_app"]
