"""What several ``kvcomm`` commands share: the config epilog of the commands that build engines,
and quieting transformers before a model loads.

Its own module so that the command modules (:mod:`~kvcomm.tools.cli_eval`,
:mod:`~kvcomm.tools.cli_bench`) need not import :mod:`kvcomm.tools.cli`, which imports them to
register their commands.
"""

from __future__ import annotations

from kvcomm.config import config_table


def config_epilog(overrides: str) -> str:
    """The help epilog of a command that builds engines: every config variable and its default."""
    width = max(len(env) for _, _, env, _ in config_table())
    rows = [f"  {env:{width}}  {default}" for _, default, env, _ in config_table()]
    return (f"Engine config: KVCOMM_* environment variables over these defaults; {overrides}. "
            "`kvcomm config` describes each field and shows the values in effect.\n\n\b\n" + "\n".join(rows))


def quiet_transformers() -> None:
    """Silence transformers' load-time progress bars and notices in CLI runs."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
