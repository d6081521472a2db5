"""``python -m flashlab.bench TARGET [options]``: dispatch to the chosen benchmark (see :data:`TARGETS`)."""

import importlib
import sys

TARGETS = {
    "cpu": "flashlab.bench.cpu",
    "gpu": "flashlab.bench.gpu",
    "memory": "flashlab.bench.memory",
    "profile": "flashlab.bench.profile",
    "kernels": "flashlab.bench.kernels",
    "decode": "flashlab.bench.decode",
    "tensor-cores": "flashlab.bench.tensor_core",
    "train": "flashlab.bench.train",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in TARGETS:
        print(f"usage: python -m flashlab.bench {{{','.join(TARGETS)}}} [options]  (--help per target)")
        return 2
    return importlib.import_module(TARGETS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
