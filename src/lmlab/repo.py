"""The lmlab checkout this code runs from: its conf/ and data/, and the commit a run records.

A module of its own at the bottom of the package, so that configs (lmlab.cli), resumes
(lmlab.checkpoint.resume) and run records (lmlab.run.info) can all find it without importing each other.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # src/lmlab/repo.py -> the checkout
