"""Background jobs: the job core (core.py), the block-job layer on top of it
(block_job.py, rate limits in ratelimit.py) and the jobs themselves, one module each."""
