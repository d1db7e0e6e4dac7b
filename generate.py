"""Sample text from a trained model:

python generate.py ckpt=outputs/runs/<run>/checkpoints/last.ckpt prompt="ROMEO:"
python generate.py ckpt=... temperature=0                  # greedy
python generate.py ckpt=... top_p=0.9 num_samples=3 seed=7  # nucleus sampling, three samples
python generate.py ckpt=... num_beams=4                     # beam search
"""

import sys

import hydra
from omegaconf import DictConfig

from lmlab.errors import LmlabError


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    from lmlab.text_generation import generate_from_config

    try:
        generate_from_config(cfg)
    except LmlabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
