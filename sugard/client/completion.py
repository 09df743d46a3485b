"""`sugarctl completion bash|zsh|fish`: shell completion scripts, made from sugarctl's own
command table (sugard.client.ctl.COMMANDS), so they offer exactly what the parser takes.

Instance names come from the running daemon at each TAB (`sugarctl status --names`, on the
socket the command line names with --socket, if any); with no daemon, none are offered.
Imported by sugard.client.ctl only for `completion`.
"""

from __future__ import annotations

from sugard.client.ctl import API_VALUED, CHOICES, COMMANDS, VALUED, fish_quote
from sugard.client.help import long_option, option_summary, summary

TYPE_CHECKING = False  # typing costs an import; mypy treats this name as True
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["script"]


def script(shell: str) -> str:
    """The completion script for `shell` (bash, zsh or fish)."""
    return {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell]()


def _with_name() -> list[str]:
    """The commands whose first argument is an instance NAME."""
    return [c for c, (req, opt, _) in COMMANDS.items() if (req + opt)[:1] == ("NAME",)]


def _options(command: str) -> list[str]:
    return sorted(COMMANDS[command][2])


def _fill(template: str, **values: str) -> str:
    # Placeholders as @KEY@: shell scripts are full of the braces and dollars that
    # str.format and string.Template use.
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    return template


def _shared() -> dict[str, str]:
    valued = sorted((VALUED | API_VALUED) - {"--socket"})
    return {
        "COMMANDS": " ".join(COMMANDS),
        "VALUED": "|".join(valued),
        "WITH_NAME": "|".join(_with_name()),
        "FORMATS": " ".join(CHOICES["--format"]),
        "SHELLS": " ".join(CHOICES["--shell"]),
        "COMPLETION_SHELLS": " ".join(CHOICES["SHELL"]),
    }


_BASH = r"""# bash completion for sugarctl, from `sugarctl completion bash`
_sugarctl() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    local ctl=${COMP_WORDS[0]} command="" word i args=0
    local -a socket=()
    [[ $ctl == "~/"* ]] && ctl=$HOME/${ctl#"~/"}
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        if [[ $command == exec ]] && ((args >= 1)) && [[ $word == -- || $word != -* ]]; then
            # exec's CMD [ARGS...]: a command line of its own
            [[ $word == -- ]] && ((i++))
            if ((i >= COMP_CWORD)); then
                COMPREPLY=($(compgen -c -- "$cur"))
            elif declare -F _command_offset >/dev/null; then
                _command_offset "$i"
            else
                COMPREPLY=($(compgen -f -- "$cur"))
            fi
            return
        fi
        case $word in
            --socket) socket=(--socket "${COMP_WORDS[i+1]}"); ((i++)) ;;
            --socket=*) socket=("$word") ;;
            @VALUED@) ((i++)) ;;
            -*) ;;
            *) if [[ -z $command ]]; then command=$word; else ((args++)); fi ;;
        esac
    done
    case $prev in
        --socket|--input|-o) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --format) COMPREPLY=($(compgen -W "@FORMATS@" -- "$cur")); return ;;
        --shell) COMPREPLY=($(compgen -W "@SHELLS@" -- "$cur")); return ;;
        @VALUED@) return ;;
    esac
    if [[ -z $command ]]; then
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "--socket --help --version" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "@COMMANDS@" -- "$cur"))
        fi
        return
    fi
    if [[ $cur == -* ]]; then
        local options=""
        case $command in
@BASH_OPTIONS@
        esac
        COMPREPLY=($(compgen -W "$options --socket --help" -- "$cur"))
        return
    fi
    if [[ $command == exec ]] && ((args >= 1)); then
        COMPREPLY=($(compgen -c -- "$cur"))
        return
    fi
    ((args == 0)) || return
    case $command in
        @WITH_NAME@)
            local names
            names=$("$ctl" "${socket[@]}" status --names 2>/dev/null)
            COMPREPLY=($(compgen -W "$names" -- "$cur")) ;;
        help) COMPREPLY=($(compgen -W "@COMMANDS@" -- "$cur")) ;;
        completion) COMPREPLY=($(compgen -W "@COMPLETION_SHELLS@" -- "$cur")) ;;
    esac
}
complete -F _sugarctl sugarctl
"""


def _option_cases(case: Callable[[str, str], str]) -> str:
    """One case line per command that takes options: `case(command, its options)`."""
    return "\n".join(
        case(command, " ".join(_options(command))) for command in COMMANDS if _options(command)
    )


def _bash() -> str:
    options = _option_cases(lambda command, o: f'            {command}) options="{o}" ;;')
    return _fill(_BASH, BASH_OPTIONS=options, **_shared())


_ZSH = r"""#compdef sugarctl
# zsh completion for sugarctl, from `sugarctl completion zsh`
_sugarctl() {
    local cur=${words[CURRENT]} prev=${words[CURRENT-1]}
    local ctl=${words[1]} command="" word
    local -a socket
    local -i i args=0
    for ((i = 2; i < CURRENT; i++)); do
        word=${words[i]}
        if [[ $command == exec ]] && ((args >= 1)) && [[ $word == -- || $word != -* ]]; then
            # exec's CMD [ARGS...]: a command line of its own
            [[ $word == -- ]] && ((i++))
            shift $((i - 1)) words
            ((CURRENT -= i - 1))
            _normal
            return
        fi
        case $word in
            --socket) socket=(--socket ${words[i+1]}); ((i++)) ;;
            --socket=*) socket=($word) ;;
            @VALUED@) ((i++)) ;;
            -*) ;;
            *) if [[ -z $command ]]; then command=$word; else ((args++)); fi ;;
        esac
    done
    case $prev in
        --socket|--input|-o) _files; return ;;
        --format) compadd -- @FORMATS@; return ;;
        --shell) compadd -- @SHELLS@; return ;;
        @VALUED@) return ;;
    esac
    if [[ -z $command ]]; then
        if [[ $cur == -* ]]; then
            compadd -- --socket --help --version
        else
            compadd -- @COMMANDS@
        fi
        return
    fi
    if [[ $cur == -* ]]; then
        case $command in
@ZSH_OPTIONS@
        esac
        compadd -- --socket --help
        return
    fi
    if [[ $command == exec ]] && ((args >= 1)); then
        _command_names -e
        return
    fi
    ((args == 0)) || return
    case $command in
        @WITH_NAME@)
            compadd -- ${(f)"$($ctl $socket status --names 2>/dev/null)"} ;;
        help) compadd -- @COMMANDS@ ;;
        completion) compadd -- @COMPLETION_SHELLS@ ;;
    esac
}
if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
    _sugarctl "$@"  # autoloaded from $fpath
else
    compdef _sugarctl sugarctl  # sourced
fi
"""


def _zsh() -> str:
    options = _option_cases(lambda command, o: f"            {command}) compadd -- {o} ;;")
    return _fill(_ZSH, ZSH_OPTIONS=options, **_shared())


_FISH = r"""# fish completion for sugarctl, from `sugarctl completion fish`
function __sugarctl_args --description 'sugarctl: the command, then how many words it has'
    set -l tokens (commandline -opc)
    set -l command
    set -l count 0
    set -l skip 0
    for token in $tokens[2..-1]
        if test $skip = 1
            set skip 0
            continue
        end
        switch $token
            case --socket @FISH_VALUED@
                set skip 1
            case '-*'
            case '*'
                if test -z "$command"
                    set command $token
                else
                    set count (math $count + 1)
                end
        end
    end
    echo "$command"  # a line each: (__sugarctl_args) splits on lines
    echo $count
end

# Is the word being completed argument POSITION (0: the first) of a command in WANTED?
function __sugarctl_at --argument-names wanted position
    set -l at (__sugarctl_args)
    contains -- "$at[1]" (string split , -- $wanted); and test "$at[2]" = "$position"
end

function __sugarctl_instances --description 'sugarctl: the instances the running sugard serves'
    set -l tokens (commandline -opc)
    set -l socket
    for i in (seq (count $tokens))
        if test "$tokens[$i]" = --socket; and set -q tokens[(math $i + 1)]
            set socket --socket $tokens[(math $i + 1)]
        end
    end
    $tokens[1] $socket status --names 2>/dev/null
end

complete -c sugarctl -f
complete -c sugarctl -l socket -r -F -d "the daemon's socket"
complete -c sugarctl -s h -l help -d 'print the help'
complete -c sugarctl -n __fish_use_subcommand -l version -d "print sugarctl's version"
@FISH_COMMANDS@
complete -c sugarctl -n '__sugarctl_at @FISH_WITH_NAME@ 0' -a '(__sugarctl_instances)'
complete -c sugarctl -n '__sugarctl_at exec 1' -a '(__fish_complete_command)'
complete -c sugarctl -n '__sugarctl_at help 0' -a '@COMMANDS@'
complete -c sugarctl -n '__sugarctl_at completion 0' -a '@COMPLETION_SHELLS@'
"""


def _fish() -> str:
    lines = []
    for command in COMMANDS:
        description = fish_quote(summary(command))
        lines.append(f"complete -c sugarctl -n __fish_use_subcommand -a {command} -d {description}")
        for option in _options(command):
            choices = CHOICES.get(option)
            values = (
                f" -x -a '{' '.join(choices)}'" if choices else (" -x" if option in VALUED else "")
            )
            if option in ("--input", "-o"):
                values = " -r -F"
            elif option in API_VALUED:
                values = " -x"
            what = f"one of {', '.join(choices)}" if choices else option_summary(command, option)
            long = option if option.startswith("--") else long_option(command, option)
            names = f"-l {long[2:]}" if long else ""
            if not option.startswith("--"):
                names = f"-s {option[1:]} {names}".rstrip()
            lines.append(
                f"complete -c sugarctl -n '__fish_seen_subcommand_from {command}' "
                f"{names}{values} -d {fish_quote(what)}"
            )
    return _fill(
        _FISH,
        FISH_COMMANDS="\n".join(lines),
        FISH_VALUED=" ".join(sorted((VALUED | API_VALUED) - {"--socket"})),
        FISH_WITH_NAME=",".join(_with_name()),
        **_shared(),
    )
