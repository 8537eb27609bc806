"""`rag-dpo` command line. Each stage owns a `commands.py` with a `register(app)` that adds its subcommands;
each subcommand calls one public function of its stage. Heavy imports (torch, transformers) happen inside the
commands, so `rag-dpo --help` stays fast. Bad input (InputError) becomes one line on stderr and exit code 2."""

from __future__ import annotations

import importlib
import os
import sys

import typer

from rag_dpo.errors import InputError

# JAX (pulled in by bm25s when installed) must stay off the GPU, or it grabs most of its memory.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Spinning OpenMP waits make torch several times slower when processes share few cores (measured 3-4x).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train retrieval agents with process supervision and compare them with outcome-only supervision.")


@app.callback()
def _root() -> None:
    # A callback keeps `rag-dpo` a command group even while only one stage has registered a subcommand.
    pass


STAGE_COMMANDS = [
    "rag_dpo.data.commands",
    "rag_dpo.retrieval.commands",
    "rag_dpo.agent.commands",
    "rag_dpo.annotate.commands",
    "rag_dpo.pairs.commands",
    "rag_dpo.train.self_eval_commands",  # self-eval-data, self-eval-calibration (Post-Completion Learning)
    "rag_dpo.eval.commands",
    "rag_dpo.eval.writeback_commands",
    "rag_dpo.pipeline.commands",
    "rag_dpo.pipeline.compare_commands",
    "rag_dpo.share_commands",            # push, dashboard: after every stage
]

for _module in STAGE_COMMANDS:
    try:
        _mod = importlib.import_module(_module)
    except ModuleNotFoundError as _e:
        if _e.name != _module:
            raise
        continue
    _mod.register(app)


def main() -> None:
    from rag_dpo.distributed import DistributedError, init_from_env
    try:
        init_from_env()   # under torchrun / accelerate launch: join the process group before any stage runs
        app(standalone_mode=False)
    except (InputError, DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors (click's, or the copy typer >= 0.20 vendors as typer._click)
        if callable(getattr(e, "show", None)) and hasattr(e, "exit_code"):
            e.show()
            sys.exit(2)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
