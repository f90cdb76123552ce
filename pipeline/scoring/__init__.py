"""Content scoring: the CLIP embedder, the heads that read its embeddings (alignment, NSFW, bias), the policy that
turns scores into a decision, and the prompt screen that runs before generation. Stages live in
``pipeline.stages.score``; see ``pipeline/scoring/README.md`` for the map."""
