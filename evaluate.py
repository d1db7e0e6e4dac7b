"""Score any text with a trained model: loss, perplexity and bits per byte.

python evaluate.py ckpt=outputs/runs/<run>/checkpoints/last.ckpt data.path=other.txt
"""

import sys

import hydra
from omegaconf import DictConfig

from lmlab.errors import LmlabError


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from lmlab.evaluation import evaluate_from_config

    try:
        evaluate_from_config(cfg)
    except LmlabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
