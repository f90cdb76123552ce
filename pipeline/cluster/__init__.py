"""Running jobs on a Ray cluster through the Jobs API: ``genpipe submit | status | logs | stop``.

resources.py   resource_plan (what a spec asks the scheduler for) and check_fit (does it fit these nodes)
connection.py  Dashboard: address, token, timeouts, one-line errors; the JobSubmissionClient behind it
submit.py      Submission: entrypoint, runtime_env (project + allow-listed env vars), metadata, submission id
cli.py         register(sub): the four subcommands
"""
