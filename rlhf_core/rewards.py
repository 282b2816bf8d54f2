"""Reward functions: rule-based scores of a batch of responses, combined as a weighted sum.

Every reward function has one signature, batched so a user function can vectorise (or call a model once):
    fn(prompts: list[str], responses: list[str], **columns: list) -> Sequence[float]   # [B] -> [B]
`columns` are the dataset's other columns for the same rows (e.g. answer=[...]) and `prompt_messages`: each
prompt as the list of `{"role", "content"}` messages the chat template rendered (a plain string prompt is one user
turn; `prompts` holds the text: the user's message, or every turn as "role: content" for a multi-turn prompt), and
`response_length`: each response's length in tokens (EOS included) where the rows are generated rollouts; a
spec's `options` come as keyword arguments too. A function takes **columns and ignores what it does not use. A
function is a built-in name ("arithmetic_answer") or an import path "package.module:function". Outputs are checked
(length, finite floats) here, because a NaN reward would otherwise surface steps later as a NaN loss with no hint
of which function produced it.
"""

import hashlib
import importlib
import inspect
import math
import numbers
import re
import threading
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from rlhf_core.errors import UserInputError
from rlhf_core.registry import lookup, register
from rlhf_core.verifiable import extract_final_number

RewardFunction = Callable[..., Sequence[float]]
REWARD_FUNCTIONS: dict[str, RewardFunction] = {}

_ANSWER_LINE = re.compile(r"\s*answer\s*:\s*-?[0-9][0-9,]*(?:\.[0-9]+)?\s*\.?\s*", re.IGNORECASE)
_INTEGER_STRING = re.compile(r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.0*)?")
_IDENTIFIER_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


class RewardError(RuntimeError):
    """A reward function raised, or returned something other than one finite float per row."""


def _as_int(answer: object, row: int) -> int:
    """The reference answer as an int: an int, an integral float, or a numeric string ("12", "1,234")."""
    if isinstance(answer, numbers.Integral) and not isinstance(answer, bool):
        return int(answer)
    if isinstance(answer, float) and answer.is_integer():
        return int(answer)
    if isinstance(answer, str) and _INTEGER_STRING.fullmatch(answer.strip()):
        return extract_final_number(answer)
    raise ValueError(f"row {row}: answer {answer!r} is not an integer")


@register(REWARD_FUNCTIONS, "arithmetic_answer")
def arithmetic_answer(prompts: list[str], responses: list[str], *, answer: list, **columns: list) -> list[float]:
    """1.0 where the last number in the response equals the `answer` column, else 0.0."""
    pairs = enumerate(zip(responses, answer, strict=True))
    return [float(extract_final_number(response) == _as_int(a, row)) for row, (response, a) in pairs]


@register(REWARD_FUNCTIONS, "answer_format")
def answer_format(prompts: list[str], responses: list[str], **columns: list) -> list[float]:
    """1.0 where the response's last line is "Answer: <number>" (any case, optional final period), else 0.0."""
    return [float(_ANSWER_LINE.fullmatch(r.rstrip().rsplit("\n", 1)[-1]) is not None) for r in responses]


@register(REWARD_FUNCTIONS, "response_length")
def response_length(prompts: list[str], responses: list[str], **columns: list) -> list[float]:
    """-(number of whitespace-separated words) / 100: a simple length penalty."""
    return [-len(r.split()) / 100 for r in responses]


@register(REWARD_FUNCTIONS, "overlong_penalty")
def overlong_penalty(prompts: list[str], responses: list[str], *, response_length: list, max_new_tokens: int,
                     buffer_tokens: int, **columns: list) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), with L_max = max_new_tokens and L_cache =
    buffer_tokens (both from the spec's `options`; max_new_tokens as in the generation section): 0 for a response
    of up to L_max - L_cache tokens, then (L_max - L_cache - n) / L_cache, down to -1 at L_max tokens."""
    if not 1 <= buffer_tokens <= max_new_tokens:
        raise ValueError(f"options need 1 <= buffer_tokens <= max_new_tokens; got {buffer_tokens}, {max_new_tokens}")
    start = max_new_tokens - buffer_tokens
    return [max(-1.0, min(0.0, (start - int(n)) / buffer_tokens)) for n in response_length]


@register(REWARD_FUNCTIONS, "vader_sentiment")
def vader_sentiment(prompts: list[str], responses: list[str], **columns: list) -> list[float]:
    """VADER's compound sentiment score of the response, in [-1, 1] (Hutto & Gilbert 2014; rule-based, no model).
    It is also the judge of the shipped preference pairs, so it checks a reward model trained on them."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # imported on first use: loads a lexicon

    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(r)["compound"] for r in responses]


def resolve_reward_function(name: str) -> Callable:
    """A built-in by name, or the callable at "package.module:function"; UserInputError saying what is wrong."""
    if ":" not in name:
        try:
            return lookup(REWARD_FUNCTIONS, name, "reward function")
        except ValueError as e:
            raise UserInputError(f"{e}, or an import path 'package.module:function'") from None
    module_name, _, attribute = name.partition(":")
    if not (_IDENTIFIER_PATH.fullmatch(module_name) and _IDENTIFIER_PATH.fullmatch(attribute)):
        raise UserInputError(f"reward function {name!r}: malformed import path; expected 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not f"{module_name}.".startswith(f"{e.name}."):  # the module imports something missing
            raise UserInputError(f"reward function {name!r}: cannot import {module_name!r}: {type(e).__name__}: "
                                 f"{e}") from e
        raise UserInputError(f"reward function {name!r}: no module named {e.name!r} (searched the current directory "
                             "and the installed packages; put the file in the directory you run from, or "
                             "install it)") from e
    except Exception as e:  # any other error in the user's module (SyntaxError, ImportError, ...) lands here
        raise UserInputError(f"reward function {name!r}: cannot import {module_name!r}: {type(e).__name__}: "
                             f"{e}") from e
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise UserInputError(f"reward function {name!r}: {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserInputError(f"reward function {name!r}: {attribute!r} is a {type(obj).__name__}, not callable")
    return obj


ALWAYS_PASSED = ["prompt_messages", "response_length"]  # besides data.extra_columns (response_length: tokens)


def check_reward_columns(name: str, extra_columns: list[str], options: Mapping | None = None) -> None:
    """The keyword arguments the function's signature requires (those without a default, beyond prompts and
    responses) are among `extra_columns` (the ones the flow passes), ALWAYS_PASSED and the spec's `options`:
    checked before any response is generated, not when the first batch is scored."""
    function = resolve_reward_function(name)
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable without a signature: nothing to check
        return
    required = [p.name for p in parameters[2:] if p.default is inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if missing := [column for column in required if column not in [*extra_columns, *ALWAYS_PASSED, *(options or {})]]:
        raise UserInputError(f"reward function {name!r} needs the argument(s) {missing}, which neither "
                             f"data.extra_columns ({extra_columns}) nor its options pass: add them, or use another "
                             "reward")


def _checked(name: str, output: object, n_rows: int) -> np.ndarray:
    """The function's output as float64 [B]; RewardError naming the function and the first bad row."""
    if hasattr(output, "tolist"):  # numpy arrays and torch tensors
        output = output.tolist()
    if isinstance(output, (str, bytes, Mapping)) or not isinstance(output, Sequence):
        raise RewardError(f"reward function {name!r} returned {type(output).__name__}, not a sequence of floats")
    if len(output) != n_rows:
        raise RewardError(f"reward function {name!r} returned {len(output)} values for {n_rows} rows (wrong length)")
    for row, value in enumerate(output):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardError(f"reward function {name!r}: row {row} is not a number: {value!r:.80}")
        if not math.isfinite(value):
            kind = "NaN" if math.isnan(value) else "inf"
            raise RewardError(f"reward function {name!r}: row {row} is {kind}")
    return np.asarray(output, dtype=np.float64)


def call_with_timeout(fn: Callable, timeout_s: float | None, name: str, *args, **kwargs):
    """fn(*args, **kwargs), or a RewardError naming `name` when it has not returned after `timeout_s` seconds. The
    call runs in a daemon thread, which a stuck function keeps busy without holding up the process's exit."""
    if timeout_s is None:
        return fn(*args, **kwargs)
    outcome: dict[str, object] = {}

    def call() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller's thread below
            outcome["error"] = e

    thread = threading.Thread(target=call, name=f"reward {name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RewardError(f"reward function {name!r} did not return within its timeout_s={timeout_s:g} s (one call "
                          "scores a whole batch): it hangs, or needs a larger timeout_s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def compute_rewards(
    specs: Sequence[tuple[str, float]],
    prompts: list[str],
    responses: list[str],
    columns: Mapping[str, list],
    timeouts: Mapping[str, float | None] | None = None,
    options: Mapping[str, Mapping] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Weighted sum of reward functions over a batch. specs: [(name, weight)]; prompts, responses: [B];
    each column: [B]; timeouts: seconds each function's call may take (absent or None: no limit); options: keyword
    arguments per function. Returns (sum_k weight_k * reward_k: [B] float64, {name: raw reward_k [B]})."""
    names = [name for name, _ in specs]
    if not specs or len(set(names)) != len(names):
        raise ValueError(f"reward specs must name at least one function, each once; got {names}")
    n_rows = len(responses)
    lengths = {"prompts": len(prompts), **{k: len(v) for k, v in columns.items()}}
    if bad := {k: n for k, n in lengths.items() if n != n_rows}:
        raise ValueError(f"{n_rows} responses but lengths {bad}")
    total = np.zeros(n_rows, dtype=np.float64)
    per_function = {}
    for name, weight in specs:
        fn = resolve_reward_function(name)
        try:
            output = call_with_timeout(fn, (timeouts or {}).get(name), name, list(prompts), list(responses),
                                       **{k: list(v) for k, v in columns.items()}, **(options or {}).get(name, {}))
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
        per_function[name] = _checked(name, output, n_rows)
        total += weight * per_function[name]
    return total, per_function


def reward_source_fingerprint(name: str) -> str:
    """Short sha256 of the function's source (its qualified name if it has none), so a cache keyed on it
    is invalidated when a user edits the function. Helpers it calls are not included."""
    fn = resolve_reward_function(name)
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):  # built in C, defined in a REPL, or a callable object without source
        source = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    return hashlib.sha256(source.encode()).hexdigest()[:16]
