"""Read Darknet ``.cfg`` files, keeping the file and line of every section and option.

The syntax is Darknet's (``read_cfg`` in darknet's parser): one ``[section]`` header per line,
``key=value`` options under it, ``#`` or ``;`` at the start of a line for comments, and all
whitespace inside a line ignored (so ``layers = -1, -4`` is ``layers=-1,-4``). The first
section must be ``[net]``; every later section is one layer, numbered from 0 in file order.

Where Darknet is lenient this parser is strict, and says where: an option Darknet does not
know (a typo), a value that is not a number, or a layer kind it cannot build all raise
`DarknetCfgError` with ``file:line``. A repeated option keeps its first value, as in Darknet
(``option_find`` returns the first match; ``enetb0.cfg`` repeats ``decay`` in ``[net]``).
Darknet reads bytes, so a leading UTF-8 BOM is ignored and comment lines may hold any bytes (cfgs
carry GBK-encoded Chinese comments); every other line must be UTF-8.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


class DarknetCfgError(ValueError):
    """A ``.cfg`` that cannot be built, with the file and line at fault."""

    def __init__(self, path: str, line: int, message: str):
        self.path, self.line, self.message = path, line, message
        super().__init__(f"{path}:{line}: {message}")


# Section names Darknet accepts for each layer kind (``string_to_layer_type``).
SECTION_ALIASES = {
    "net": "net", "network": "net",
    "convolutional": "convolutional", "conv": "convolutional",
    "connected": "connected", "conn": "connected",
    "route": "route",
    "shortcut": "shortcut",
    "maxpool": "maxpool", "max": "maxpool",
    "avgpool": "avgpool", "avg": "avgpool",
    "upsample": "upsample",
    "yolo": "yolo",
    "softmax": "softmax", "soft": "softmax",
    "cost": "cost",
    "dropout": "dropout",
    "scale_channels": "scale_channels",
    "sam": "sam",
}

# Options each section may carry. Options that only steer Darknet's training (augmentation,
# schedules, loss weights) are accepted and kept, but do not change the network built here.
_NET_OPTIONS = frozenset("""
    batch subdivisions width height channels inputs max_crop min_crop max_ratio min_ratio center clip
    angle aspect saturation exposure hue flip blur gaussian_noise mixup cutmix mosaic mosaic_bound letter_box
    label_smooth_eps resize_step attention adversarial_lr contrastive unsupervised momentum decay
    learning_rate learning_rate_min batches_per_cycle batches_cycle_mult burn_in power max_batches policy
    step scale steps scales gamma seq_scales sgdr_cycle sgdr_mult adam B1 B2 eps time_steps track
    augment_speed sequential_subdivisions try_fix_nan loss_scale dynamic_minibatch optimized_memory
    workspace_size_limit_MB max_chart_loss ema_alpha
""".split())
_YOLO_OPTIONS = frozenset("""
    mask anchors classes num jitter ignore_thresh truth_thresh random scale_x_y iou_thresh iou_thresh_kind
    cls_normalizer obj_normalizer iou_normalizer uc_normalizer delta_normalizer iou_loss nms_kind beta_nms
    beta1 label_smooth_eps max max_delta focal_loss resize objectness_smooth new_coords counters_per_class
""".split())
OPTIONS: dict[str, frozenset[str]] = {
    "net": _NET_OPTIONS,
    "convolutional": frozenset(
        "filters size stride stride_x stride_y pad padding groups activation batch_normalize share_index "
        "dilation stopbackward".split()
    ),
    "connected": frozenset("output activation batch_normalize stopbackward".split()),
    "route": frozenset("layers groups group_id stopbackward".split()),
    "shortcut": frozenset("from activation weights_type weights_normalization stopbackward".split()),
    "maxpool": frozenset("size stride stride_x stride_y padding maxpool_depth out_channels antialiasing".split()),
    "avgpool": frozenset(),
    "upsample": frozenset("stride scale".split()),
    "yolo": _YOLO_OPTIONS,
    "softmax": frozenset("groups temperature noloss".split()),
    "cost": frozenset("type scale ratio noobject_scale thresh".split()),
    "dropout": frozenset("probability".split()),
    "scale_channels": frozenset("from scale_wh activation".split()),
    "sam": frozenset("from activation".split()),
}

_INT_LIMIT = 2**31 - 1  # Darknet reads ints with atoi into a C int
_SECTION = re.compile(r"^\[([^\[\]]+)\]$")
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")  # C's atof syntax, no inf/nan
_REQUIRED = object()


@dataclass(frozen=True)
class Option:
    key: str
    value: str
    line: int


@dataclass
class Section:
    """One ``[kind]`` block. ``index`` is the Darknet layer index (-1 for ``[net]``)."""

    kind: str
    header: str
    line: int
    path: str
    index: int
    options: dict[str, Option] = field(default_factory=dict)

    # -- errors ------------------------------------------------------------------------------
    def error(self, message: str, key: str | None = None) -> DarknetCfgError:
        """A `DarknetCfgError` at ``key``'s line (or the header's), naming this layer."""
        line = self.options[key].line if key in self.options else self.line
        where = f"[{self.header}]" if self.index < 0 else f"layer {self.index} [{self.header}]"
        return DarknetCfgError(self.path, line, f"{where}: {message}")

    # -- typed access ---------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.options

    def _raw(self, key: str, default):
        if key in self.options:
            return self.options[key].value
        if default is _REQUIRED:
            raise self.error(f"missing option {key!r}")
        return None

    def get_str(self, key: str, default=_REQUIRED) -> str:
        raw = self._raw(key, default)
        return default if raw is None else raw

    def get_int(self, key: str, default=_REQUIRED, *, min_value: int | None = None) -> int:
        raw = self._raw(key, default)
        value = default if raw is None else _to_int(self, key, raw)
        if min_value is not None and value < min_value:
            raise self.error(f"{key}={value} must be >= {min_value}", key)
        return value

    def get_float(self, key: str, default=_REQUIRED) -> float:
        raw = self._raw(key, default)
        return default if raw is None else _to_float(self, key, raw)

    def get_ints(self, key: str, default=_REQUIRED) -> list[int]:
        raw = self._raw(key, default)
        if raw is None:
            return list(default)
        return [_to_int(self, key, item) for item in _split_list(self, key, raw)]

    def get_floats(self, key: str, default=_REQUIRED) -> list[float]:
        raw = self._raw(key, default)
        if raw is None:
            return list(default)
        return [_to_float(self, key, item) for item in _split_list(self, key, raw)]


def _split_list(section: Section, key: str, raw: str) -> list[str]:
    items = raw.split(",")
    if items and items[-1] == "":  # Darknet tolerates a trailing comma ("anchors = 10,13, ... ,")
        items = items[:-1]
    if not items or any(item == "" for item in items):
        raise section.error(f"{key}={raw!r} is not a comma-separated list of numbers", key)
    return items


def _to_int(section: Section, key: str, raw: str) -> int:
    if not _INT.match(raw):
        raise section.error(f"{key}={raw!r} is not an integer", key)
    value = int(raw)
    if abs(value) > _INT_LIMIT:
        raise section.error(f"{key}={raw} is out of range", key)
    return value


def _to_float(section: Section, key: str, raw: str) -> float:
    if not _FLOAT.match(raw):
        raise section.error(f"{key}={raw!r} is not a number", key)
    value = float(raw)
    if not math.isfinite(value):
        raise section.error(f"{key}={raw!r} is out of range", key)
    return value


@dataclass
class DarknetCfg:
    """A parsed cfg: the ``[net]`` section and the layer sections in order."""

    path: str
    net: Section
    layers: list[Section]

    @property
    def name(self) -> str:
        return Path(self.path).stem


def parse_cfg_text(text: str, path: str = "<cfg>") -> DarknetCfg:
    """Parse cfg ``text``; ``path`` is only used to name the file in errors. A leading BOM is ignored."""
    sections: list[Section] = []
    for number, raw_line in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        line = "".join(raw_line.split())  # Darknet's strip(): drop every whitespace character
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            match = _SECTION.match(line)
            if not match:
                raise DarknetCfgError(path, number, f"malformed section header {raw_line.strip()!r}")
            header = match.group(1)
            kind = SECTION_ALIASES.get(header)  # case-sensitive, as Darknet's strcmp
            if kind is None:
                known = ", ".join(sorted({f"[{k}]" for k in SECTION_ALIASES.values()}))
                raise DarknetCfgError(path, number, f"unknown or unsupported section [{header}] (supported: {known})")
            if not sections and kind != "net":
                raise DarknetCfgError(path, number, f"the first section must be [net], got [{header}]")
            if sections and kind == "net":
                raise DarknetCfgError(path, number, "a second [net] section")
            sections.append(Section(kind, header, number, path, len(sections) - 1))
            continue
        if not sections:
            raise DarknetCfgError(path, number, f"option {raw_line.strip()!r} before the first section")
        key, sep, value = line.partition("=")
        section = sections[-1]
        if not sep or not key:
            raise DarknetCfgError(path, number, f"[{section.header}]: expected key=value, got {raw_line.strip()!r}")
        if value == "":
            raise DarknetCfgError(path, number, f"[{section.header}]: option {key!r} has no value")
        if key not in OPTIONS[section.kind]:
            raise DarknetCfgError(path, number, f"[{section.header}]: unknown or unsupported option {key!r}")
        section.options.setdefault(key, Option(key, value, number))
    if not sections:
        raise DarknetCfgError(path, 1, "no [net] section: not a Darknet cfg")
    if len(sections) == 1:
        raise DarknetCfgError(path, sections[0].line, "the cfg has no layers after [net]")
    return DarknetCfg(path, sections[0], sections[1:])


def _decode(data: bytes, path: str) -> str:
    """The text of a cfg file. Darknet reads bytes and skips comment lines whatever they hold (cfgs carry
    comments in GBK and other legacy encodings), so only the lines it reads must be UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    lines = []
    for number, raw_line in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw_line.decode("utf-8"))
        except UnicodeDecodeError:
            if raw_line.strip()[:1] not in (b"#", b";"):
                raise DarknetCfgError(path, number, "not a text file (invalid UTF-8 outside a comment)") from None
            lines.append(raw_line.decode("utf-8", errors="replace"))
    return "\n".join(lines)


def parse_cfg(path: str | os.PathLike) -> DarknetCfg:
    """Parse a ``.cfg`` file (see `parse_cfg_text`); comment lines may hold bytes that are not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DarknetCfgError(str(path), 0, f"cannot read cfg ({e.strerror or e})") from None
    return parse_cfg_text(_decode(data, str(path)), str(path))
