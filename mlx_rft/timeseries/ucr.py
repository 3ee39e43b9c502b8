"""UCR/UEA time-series classification data: a `.ts` reader, and the sets shipped in the aeon wheel.

The PyPI package `aeon` ships a few real UCR/UEA datasets as
`aeon/datasets/data/<Name>/<Name>_{TRAIN,TEST}.ts`. We only read those files: the package is
located on disk without being imported (importing it pulls in scikit-learn, numba and more, none
of which we need), and the `.ts` format is parsed here.

The format (sktime/aeon): `#` or `%` comment lines, `@tag value` header lines (tags are
case-insensitive), then after `@data` one series per line: channels separated by `:`, values by
`,`, the class label last. `?` or `NaN` is a missing value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MlxRftError

TASK_PREFIX = "ucr:"


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays field by field is ambiguous
class TSData:
    """A labelled collection of series, as read from one `.ts` file."""

    name: str
    series: tuple[np.ndarray, ...]  # each float32 [channels, length]; NaN marks a missing value
    labels: tuple[str, ...]  # one per series ("" when the file has no labels)
    classes: tuple[str, ...]  # the @classLabel labels in file order; () when not classification
    channels: int
    equal_length: bool  # every series has the same length
    has_missing: bool  # some value is NaN

    def __len__(self) -> int:
        return len(self.series)

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(s.shape[1] for s in self.series)


# ---------------------------------------------------------------------------------------------
# The .ts header


@dataclass(frozen=True)
class _Header:
    name: str | None
    univariate: bool | None
    dimensions: int | None
    equal_length: bool | None
    series_length: int | None
    classes: tuple[str, ...] | None  # None: no class labels (@classLabel false or absent)
    target: bool  # @targetLabel true: the last field is a regression target

    @property
    def labelled(self) -> bool:
        return self.classes is not None or self.target


# Lower-cased tag -> its usual spelling (for messages).
_TAGS = {
    t.lower(): t
    for t in (
        "problemName", "timeStamps", "missing", "univariate", "dimensions", "equalLength",
        "seriesLength", "classLabel", "targetLabel", "data",
    )
}


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise MlxRftError(f".ts file {str(path)!r} does not exist; pass the path of a .ts file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MlxRftError(
            f"{path}:{line}: the file is not UTF-8 text (byte {data[e.start:e.start + 1]!r}); "
            "re-save it as UTF-8"
        ) from None


def _content_lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped line) of every line that is not blank or a comment."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith(("#", "%")):
            yield lineno, line


def _bool(value: str, tag: str, where: str) -> bool:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise MlxRftError(f"{where}: @{tag} needs true or false, not {value!r}; fix the header line")


def _positive_int(value: str, tag: str, where: str) -> int:
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise MlxRftError(
        f"{where}: @{tag} needs a whole number > 0, not {value!r}; fix the header line"
    )


def _class_labels(value: str, where: str) -> tuple[str, ...] | None:
    flag, *labels = value.split() or [""]
    if not _bool(flag, "classLabel", where):
        return None
    if not labels:
        raise MlxRftError(
            f"{where}: @classLabel true needs the labels after it (e.g. `@classLabel true 1 2`); "
            "list every class label"
        )
    return tuple(labels)


def _header_tags(path: Path, lines: Iterator[tuple[int, str]]) -> dict[str, tuple[str, str]]:
    """Lower-cased tag -> (value, where) for every header line; consumes `lines` up to @data."""
    tags: dict[str, tuple[str, str]] = {}
    for lineno, line in lines:
        where = f"{path}:{lineno}"
        if not line.startswith("@"):
            raise MlxRftError(
                f"{where}: a data row before the @data line ({line[:40]!r}); put @data on the "
                "line after the header"
            )
        tag, *rest = line[1:].split(None, 1)
        value = rest[0] if rest else ""
        key = tag.lower()
        if key not in _TAGS:
            raise MlxRftError(
                f"{where}: unknown header tag @{tag}; use the .ts tags "
                f"({', '.join('@' + t for t in _TAGS.values())}) or make the line a # comment"
            )
        if key == "data":
            return tags
        tags[key] = (value.strip(), where)
    raise MlxRftError(f"{path} has no @data line; put @data on the line before the first series")


def _read_header(path: Path, lines: Iterator[tuple[int, str]]) -> _Header:
    tags = _header_tags(path, lines)

    def get(key: str, parse):
        if key not in tags:
            return None
        value, where = tags[key]
        return parse(value, _TAGS[key], where)

    if get("timestamps", _bool):
        raise MlxRftError(
            f"{tags['timestamps'][1]}: @timeStamps true ((time,value) pairs) is not supported; "
            "re-save the data without timestamps (one comma-separated value list per channel) "
            "and set @timeStamps false"
        )
    if "classlabel" not in tags and "targetlabel" not in tags:
        # aeon then reads the last field as a label; saying so beats guessing either way
        raise MlxRftError(
            f"{path} has no @classLabel line, so it is unclear whether rows end with a label; add "
            "`@classLabel true <labels...>` (or `@classLabel false` for unlabelled series)"
        )
    univariate = get("univariate", _bool)
    dimensions = get("dimensions", _positive_int)
    if univariate and dimensions not in (None, 1):
        raise MlxRftError(
            f"{tags['dimensions'][1]}: @dimensions {dimensions} contradicts @univariate true; "
            "set @univariate false or @dimensions 1"
        )
    return _Header(
        name=tags.get("problemname", ("", ""))[0] or None,
        univariate=univariate,
        dimensions=dimensions,
        equal_length=get("equallength", _bool),
        series_length=get("serieslength", _positive_int),
        classes=get("classlabel", lambda v, _t, w: _class_labels(v, w)),
        target=bool(get("targetlabel", _bool)),
    )


# ---------------------------------------------------------------------------------------------
# The .ts data rows


def _bad_value(parts: list[str], where: str, channel: int) -> MlxRftError:
    for i, part in enumerate(parts, start=1):
        if part.strip() == "?":
            continue
        try:
            float(part)
        except ValueError:
            return MlxRftError(
                f"{where}: channel {channel}, value {i} ({part.strip()[:40]!r}) is not a number; "
                "write numbers, with ? or NaN for a missing value"
            )
    return MlxRftError(f"{where}: channel {channel} could not be read as numbers; fix the row")


def _parse_channel(text: str, where: str, channel: int) -> np.ndarray:
    parts = text.split(",")
    try:
        # numpy parses the strings itself (fast); "?" is the format's other spelling of NaN.
        # Values beyond float32 range become inf (refused below), not a warning.
        with np.errstate(over="ignore"):
            values = np.array([p.replace("?", "nan") for p in parts], dtype=np.float32)
    except ValueError:
        raise _bad_value(parts, where, channel) from None
    if np.isinf(values).any():
        raise MlxRftError(
            f"{where}: channel {channel} has an infinite value (or one beyond float32 range); "
            "write finite numbers, with ? for a missing value"
        )
    return values


def _parse_row(line: str, where: str, header: _Header) -> tuple[np.ndarray, str]:
    """One series [channels, length] and its label ("" when the file has none)."""
    fields = line.split(":")
    label = ""
    if header.labelled:
        if len(fields) < 2:
            raise MlxRftError(
                f"{where}: the row has no label; end it with :LABEL (the header declares labels)"
            )
        label = fields.pop().strip()
        if not label:
            raise MlxRftError(f"{where}: the row's label (after the last ':') is empty; add it")
    channels = [_parse_channel(f, where, c) for c, f in enumerate(fields, start=1)]
    lengths = sorted({len(c) for c in channels})
    if len(lengths) > 1:
        raise MlxRftError(
            f"{where}: the channels have different lengths ({', '.join(map(str, lengths))}); every "
            "channel of one series needs the same number of values (pad with ? if some are missing)"
        )
    return np.stack(channels), label


@dataclass
class _Expect:
    """What every row must match, and where that rule came from (for messages)."""

    channels: int | None
    channels_from: str
    length: int | None
    length_from: str


def _expectations(header: _Header) -> _Expect:
    if header.dimensions:
        channels, channels_from = header.dimensions, "@dimensions"
    elif header.univariate:
        channels, channels_from = 1, "@univariate true"
    else:
        channels, channels_from = None, ""
    if header.equal_length is not False and header.series_length:
        length, length_from = header.series_length, "@seriesLength"
    else:
        length, length_from = None, ""
    return _Expect(channels, channels_from, length, length_from)


def _line(where: str) -> str:
    return "line " + where.rsplit(":", 1)[1]


def _check_row(
    values: np.ndarray, label: str, where: str, header: _Header, expect: _Expect
) -> None:
    C, T = values.shape
    if expect.channels is None:  # the first row sets the rule for the others
        expect.channels, expect.channels_from = C, f"the first series ({_line(where)})"
    elif C != expect.channels:
        raise MlxRftError(
            f"{where}: the series' channel count is {C} but {expect.channels_from} says "
            f"{expect.channels}; every series needs the same number of ':'-separated channels"
        )
    if header.equal_length and expect.length is None:
        expect.length, expect.length_from = T, f"the first series ({_line(where)})"
    if expect.length is not None and T != expect.length:
        raise MlxRftError(
            f"{where}: the series has length {T} but {expect.length_from} has {expect.length} "
            "(@equalLength true); fix the row, or set @equalLength false and drop @seriesLength"
        )
    if header.classes is not None and label not in header.classes:
        raise MlxRftError(
            f"{where}: label {label!r} is not one of the @classLabel labels "
            f"({', '.join(header.classes)}); fix the row, or add the label to the @classLabel line"
        )


def read_ts(path: str | Path) -> TSData:
    """Read a sktime/aeon `.ts` file; errors name the file and line.

    A regression file (@targetLabel true) keeps its targets as text in `labels`, with `classes`
    empty; a file with no labels at all has "" labels.
    """
    path = Path(path)
    lines = _content_lines(_read_text(path))
    header = _read_header(path, lines)  # consumes the lines up to @data
    expect = _expectations(header)
    series: list[np.ndarray] = []
    labels: list[str] = []
    for lineno, line in lines:
        where = f"{path}:{lineno}"
        values, label = _parse_row(line, where, header)
        _check_row(values, label, where, header, expect)
        series.append(values)
        labels.append(label)
    if not series:
        raise MlxRftError(f"{path} has no series after @data; add one series per line")
    return TSData(
        name=header.name or path.stem,
        series=tuple(series),
        labels=tuple(labels),
        classes=header.classes or (),
        channels=series[0].shape[0],
        equal_length=len({s.shape[1] for s in series}) == 1,
        has_missing=any(bool(np.isnan(s).any()) for s in series),
    )


# ---------------------------------------------------------------------------------------------
# The datasets shipped in the aeon wheel


def _aeon_data_root() -> Path:
    """aeon/datasets/data inside the installed aeon package, found without importing aeon."""
    import importlib.util

    try:
        # For a top-level package find_spec only locates it; aeon/__init__.py does not run.
        spec = importlib.util.find_spec("aeon")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MlxRftError(
            "the UCR/UEA datasets ship in the PyPI package aeon, which is not installed; install "
            "it with: pip install --no-deps aeon"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    if not root.is_dir():
        raise MlxRftError(
            f"{root} is missing from the aeon package; reinstall it with "
            "pip install --force-reinstall --no-deps aeon"
        )
    return root


def _strip_prefix(name: str) -> str:
    return name[len(TASK_PREFIX):] if name.startswith(TASK_PREFIX) else name


def _names_with_train(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if (d / f"{d.name}_TRAIN.ts").is_file())


def ucr_dir(name: str) -> Path:
    """The folder of the shipped dataset `name` (a leading "ucr:" is allowed)."""
    name = _strip_prefix(name)
    root = _aeon_data_root()
    available = _names_with_train(root)
    if name not in available:  # also refuses path-like names: only folder names are listed
        raise MlxRftError(
            f"unknown UCR/UEA dataset {name!r}; the aeon package ships: {', '.join(available)}"
        )
    return root / name


def _is_classification(path: Path) -> bool:
    try:
        header = _read_header(path, _content_lines(_read_text(path)))
    except MlxRftError:
        return False  # e.g. a timestamped file; not one we can load
    return header.classes is not None


def ucr_names() -> list[str]:
    """The shipped datasets with both a TRAIN and a TEST classification file (headers only read)."""
    root = _aeon_data_root()
    return [
        name for name in _names_with_train(root)
        if all(_is_classification(root / name / f"{name}_{s}.ts") for s in ("TRAIN", "TEST"))
    ]


def load_ucr(name: str) -> tuple[TSData, TSData]:
    """(train, test) of a shipped dataset, both named `name` (the files' @problemName varies)."""
    name = _strip_prefix(name)
    folder = ucr_dir(name)
    test_path = folder / f"{name}_TEST.ts"
    if not test_path.is_file():
        raise MlxRftError(
            f"the aeon package ships no test split for {name!r} ({test_path.name} is missing); "
            f"pick one of: {', '.join(ucr_names())}"
        )
    train = dataclasses.replace(read_ts(folder / f"{name}_TRAIN.ts"), name=name)
    test = dataclasses.replace(read_ts(test_path), name=name)
    if not train.classes:
        raise MlxRftError(
            f"{name} is not a classification dataset (no @classLabel labels); pick one of: "
            f"{', '.join(ucr_names())}"
        )
    if test.channels != train.channels:
        raise MlxRftError(
            f"{test_path} has {test.channels} channels but the train split has {train.channels}; "
            "the splits must match"
        )
    return train, test
