"""The team stack on one machine: PostgreSQL, an S3 endpoint, MLflow and Prefect servers.

`make stack` (`python -m stack up`) starts it, `make stack-down` stops it; all state lives
under one directory (default `.stack/`, git-ignored). See `stack.services`.
"""
