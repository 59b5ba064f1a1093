"""The `async-rl` command line.

Each subcommand lives in the module that owns the feature; that module exposes
`add_arguments(parser)` and `main(args) -> int`. Only the chosen subcommand's
module is imported, so `async-rl buffer inspect` does not pay for torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (command words, owning module, help)
SUBCOMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("engine", "serve"), "rollout_workers.engine.server", "serve the embedded engine over SGLang's RL HTTP API"),
    (("buffer", "serve"), "buffer.service", "run the replay-buffer service"),
    (("buffer", "inspect"), "buffer.inspect", "print a buffer's counts by version and staleness"),
    (("run",), "async_rl.orchestrator", "run a recipe: engines, rollout workers, buffer and trainer"),
    (("sweep",), "staleness.experiments.sweep", "run a staleness/APRIL grid and write a report"),
    (
        ("trace", "merge"),
        "async_rl.trace",
        "merge a run's per-process trace files into RUN_DIR/trace.json (ui.perfetto.dev)",
    ),
]


def _usage() -> str:
    lines = ["usage: async-rl COMMAND [args]", "", "commands:"]
    lines += [f"  {' '.join(words):<16} {help_text}" for words, _, help_text in SUBCOMMANDS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for words, module_name, help_text in SUBCOMMANDS:
        if tuple(argv[: len(words)]) == words:
            module = importlib.import_module(module_name)
            parser = argparse.ArgumentParser(prog="async-rl " + " ".join(words), description=help_text)
            module.add_arguments(parser)
            return int(module.main(parser.parse_args(argv[len(words) :])) or 0)
    print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
    return 0 if argv and argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    from async_rl.process_exit import exit_now

    exit_now(main())
