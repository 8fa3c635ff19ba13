"""Reading YAML safely: yaml.safe_load with the expansion of aliases bounded, errors as one ConfigError line."""
from __future__ import annotations

from typing import Any

from aligndistil_cli.core.errors import ConfigError

# How much a YAML document's aliases may add to it, each counted at every use (a string counts its characters, any
# other value one). Aliases are resolved by reference, so loading costs what the text does; this bounds what walking
# the result costs (a 355-byte alias bomb expands to billions of values).
YAML_MAX_EXPANDED = 1_000_000


def _expanded_size(value: Any, limit: int) -> int:
    """The size of value with every shared (aliased) part counted at each use; stops once past limit."""
    sizes: dict[int, int] = {}

    def size(v: Any) -> int:
        if isinstance(v, str):
            return max(1, len(v))
        if not isinstance(v, (dict, list)):
            return 1
        if id(v) in sizes:
            if sizes[id(v)] < 0:
                raise ConfigError("it refers to itself (a recursive alias)")
            return sizes[id(v)]
        sizes[id(v)] = -1
        total = 1
        for item in (x for kv in v.items() for x in kv) if isinstance(v, dict) else v:
            total += size(item)
            if total > limit:
                break
        sizes[id(v)] = total
        return total

    return size(value)


def parse_yaml(text: str, source: str) -> Any:
    """yaml.safe_load, refusing a document whose aliases add more than YAML_MAX_EXPANDED (one ConfigError naming
    source)."""
    import yaml  # here, not at the top: `aligndistil --help` and shell completion never read YAML

    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    limit = len(text) + YAML_MAX_EXPANDED
    try:
        size = _expanded_size(data, limit)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    if size > limit:
        raise ConfigError(f"{source}: its aliases expand it by more than {YAML_MAX_EXPANDED:,} values (an alias bomb?)")
    return data
