"""The `anytoken` command: one subcommand per workflow module, each also runnable as `python -m workflows.NAME`."""
from __future__ import annotations

import importlib
import logging
import sys

WORKFLOWS = {
    "demo": "workflows.demo",
    "demo-data": "workflows.demo_data",
    "text-tokenizer": "workflows.text_tokenizer",
    "prepare": "workflows.prepare",
    "train-tokenizer": "workflows.train_tokenizer",
    "train-clip": "workflows.train_clip",
    "train-llm": "workflows.train_llm",
    "train": "workflows.train",
    "serve": "workflows.serve",
    "evaluate": "workflows.evaluate",
}


def setup_logging() -> None:
    """The workflows' one log format; libraries below them only call logging.getLogger(__name__)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        lines = ["usage: anytoken WORKFLOW [--config FILE] [--KEY VALUE ...] [key.sub=value ...]", "", "workflows:"]
        for name, module in WORKFLOWS.items():
            doc = (importlib.import_module(module).__doc__ or "").strip().splitlines()
            lines.append(f"  {name:<14} {doc[0] if doc else ''}")
        lines.append("\n`anytoken WORKFLOW --help` shows a workflow's options.")
        print("\n".join(lines))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in WORKFLOWS:
        print(f"anytoken: unknown workflow {name!r} (known: {', '.join(WORKFLOWS)})", file=sys.stderr)
        return 2
    return importlib.import_module(WORKFLOWS[name]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
