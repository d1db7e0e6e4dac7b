"""lm_eval's command line with the `lmlab` model registered:

python -m lmlab.harness run --model lmlab --model_args ckpt=outputs/runs/<run>/checkpoints/last.ckpt --tasks lambada_openai
"""

from lm_eval.__main__ import cli_evaluate

import lmlab.harness  # noqa: F401  (registers the lmlab model)

if __name__ == "__main__":
    cli_evaluate()
