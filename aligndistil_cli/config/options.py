"""The parts every stage config is built from: a field (`opt`), an option group, and `compose`.

A group is a small dataclass of related options (how data is read, the optimizer, speed and memory...).
A stage's config is composed of groups, not inherited from a tree of mixins: `compose` lays the groups'
fields out flat, so `config.lr`, the `--lr` flag and the YAML key `lr` stay one name, and each group
becomes one panel of the stage's `--help`. A helper that needs a few fields takes its group
(`Speed.of(config)`), not the whole config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

from aligndistil_cli.core.errors import ConfigError, shown
from aligndistil_cli.model.kv_cache import KV_CACHE_HELP, KV_CACHES


def opt(default: Any = None, help: str = "", *, required: bool = False, choices: tuple | None = None,
        positive: bool = False, nonneg: bool = False, at_most: float | None = None, below: float | None = None,
        flag: str | None = None, input: str | None = None, factory=None, aliases: tuple[str, ...] = ()):
    """A config field. positive/nonneg/at_most/below/choices/required are checked when a stage config is made,
    and a float must be finite. input marks a path the stage reads, and what it is: "model", "cache" (a teacher
    cache) or "data" (a file, a directory or a hub data set). --out may not overlap an input (stages.preflight),
    and a checkpoint records what each one was (checkpoint.input_fingerprints). aliases: other names of the same
    option (TRL's, e.g. learning_rate for lr), accepted as flags and as YAML keys."""
    meta = {"help": help, "required": required, "choices": choices, "positive": positive, "nonneg": nonneg,
            "at_most": at_most, "below": below, "flag": flag, "input": input, "aliases": aliases}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class Group:
    """An option group: a dataclass whose fields are opt()s. panel titles its part of --help; validate holds
    checks across its fields (it is called on the whole stage config, so it may read the stage's other fields
    where a rule joins two groups, as --resume against --force does)."""

    panel: ClassVar[str] = "Options"

    def validate(self) -> None:
        """Cross-field checks; none by default."""

    @classmethod
    def of(cls, config: Any):
        """This group's fields of a stage config, as a group: what a helper that reads only them is given."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


@dataclass
class StageConfig:
    """What every composed config does when it is made: each field's checks, then each group's validate, then
    the stage's own rules across groups (checks)."""

    groups: ClassVar[tuple[type[Group], ...]] = ()
    checks: ClassVar[Callable[[Any], None] | None] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("required") and value in (None, ""):
                raise ConfigError(f"config field {f.name!r} is required (flag --{f.name.replace('_', '-')})")
            if value is not None:
                _check_range(f.name, value, f.metadata)
        for group in self.groups:
            group.validate(self)
        if type(self).checks is not None:
            type(self).checks(self)


def compose(name: str, *groups: type[Group], checks: Callable[[Any], None] | None = None) -> type:
    """The stage config `name`, flat, made of groups in order (the order of the help panels).

    A stage's own group, listed before the shared ones, may restate a shared field where its default or help
    differ for that stage: the first definition of a name wins. checks: the stage's rules across groups."""
    seen: dict[str, tuple[type, dataclasses.Field]] = {}
    for group in groups:
        for f in dataclasses.fields(group):
            seen.setdefault(f.name, (group, f))
    specs = [(n, _annotation(g, n), _copy(f, g.panel)) for n, (g, f) in seen.items()]
    made_of = ", ".join(g.__name__ for g in groups)
    namespace = {"groups": groups, "checks": staticmethod(checks) if checks else None,
                 "__doc__": f"The {name} stage config, made of {made_of}."}
    cls = dataclasses.make_dataclass(name, specs, bases=(StageConfig,), namespace=namespace)
    cls.__module__ = groups[0].__module__  # so that typing.get_type_hints resolves the string annotations
    return cls


def _annotation(group: type, name: str) -> Any:
    for klass in group.__mro__:
        if name in getattr(klass, "__annotations__", {}):
            return klass.__annotations__[name]
    raise TypeError(f"{group.__name__}.{name} has no annotation")


def _copy(f: dataclasses.Field, panel: str) -> dataclasses.Field:
    meta = {**f.metadata, "panel": panel}
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=meta)
    return field(default=f.default, metadata=meta)


def kv_cache_opt(prefix: str = ""):
    """The sampler's --kv-cache, worded the same in every stage that samples."""
    return opt("auto", prefix + KV_CACHE_HELP, choices=KV_CACHES)


def _check_range(name: str, value: Any, meta: Mapping) -> None:
    """One ConfigError naming the field when value is outside its field's range (inf and nan are outside all)."""
    def refuse(rule: str) -> None:
        raise ConfigError(f"config field {name!r} must be {rule}; got {shown(value)}")

    if meta.get("choices") and value not in meta["choices"]:
        refuse(f"one of {', '.join(map(str, meta['choices']))}")
    if isinstance(value, float) and not math.isfinite(value):
        refuse("a finite number")
    if meta.get("positive") and not value > 0:
        refuse("> 0")
    if meta.get("nonneg") and not value >= 0:
        refuse(">= 0")
    if meta.get("at_most") is not None and not value <= meta["at_most"]:
        refuse(f"<= {meta['at_most']:g}")
    if meta.get("below") is not None and not value < meta["below"]:
        refuse(f"< {meta['below']:g}")
