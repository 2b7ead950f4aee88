"""Tab completion in bash: `eval "$(cnnlab completion bash)"`.

Hydra registers its completion per executable (`APP -sc install=bash` completes `APP`'s own
arguments), and cnnlab's Hydra app has no executable of its own: it is `cnnlab train` (whose
`-sc install=bash`, as Hydra's help shows it, prints this same script). So the function printed
here completes the subcommand names itself and, after `cnnlab train`, asks `cnnlab completion
query`, which hands the line, without `cnnlab`, to Hydra's BashCompletion on cnnlab's config
(config groups, keys, a group's presets: `model=` lists baseline, resnet, ...).
"""

from __future__ import annotations

import os
import re
import sys

HYDRA_APP = "cnnlab-train"  # the name Hydra's completion strips from the line it is given

# The function is Hydra's own (hydra/_internal/core_plugins/bash_completion.py), less its lookup
# of the executable, plus the subcommand names. `=` leaves COMP_WORDBREAKS as Hydra's does, so
# `model=ba` is one word and its completion `model=baseline` replaces it whole.
SCRIPT = """_cnnlab_completion()
{
    local word=${COMP_WORDS[COMP_CWORD]}
    if (( COMP_CWORD == 1 )); then
        COMPREPLY=($(compgen -W "%(commands)s" -- "$word"))
        return
    fi
    case ${COMP_WORDS[1]} in
        train)
            local line=${COMP_LINE:0:COMP_POINT}
            local choices
            choices=$(COMP_LINE="$line" COMP_POINT=${#line} "${COMP_WORDS[0]}" completion query 2>/dev/null)
            compopt -o nospace 2>/dev/null  # after `model=`, the value follows without a space
            COMPREPLY=($(compgen -W "$choices" -- "$word"))
            ;;
        completion)
            COMPREPLY=($(compgen -W "bash query" -- "$word"))
            ;;
        *)
            COMPREPLY=($(compgen -f -- "$word"))
            ;;
    esac
}

COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o default -F _cnnlab_completion cnnlab
"""

UNINSTALL = "complete -r cnnlab 2>/dev/null; unset -f _cnnlab_completion"


def bash_script(commands: list[str]) -> str:
    return SCRIPT % {"commands": " ".join(commands)}


def query(line: str) -> None:
    """Print Hydra's completions for a `cnnlab train ...` line (COMP_LINE up to the cursor)."""
    from cnnlab.train import main

    found = re.match(r"\s*\S+\s+(\S+)(?:\s+(.*))?$", line, re.DOTALL)  # cnnlab, the subcommand, the rest
    if found is None or found.group(1) != "train":
        return  # the other subcommands' arguments are not completed by Hydra
    os.environ["COMP_LINE"] = f"{HYDRA_APP} {found.group(2) or ''}"
    sys.argv = [HYDRA_APP, "--shell-completion", "query=bash"]
    main()  # Hydra answers the query (BashCompletion.query prints the matches) instead of running the job
