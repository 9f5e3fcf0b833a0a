"""ciess-prod: per-row embedding size search (CIESS) and real embedding-table compression."""

__version__ = "0.1.0"
