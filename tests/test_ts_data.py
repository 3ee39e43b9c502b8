"""The time-series data layer: the .ts reader, the UCR/UEA sets in the aeon wheel, rows, baselines."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_rft.errors import MlxRftError
from mlx_rft.timeseries.baselines import majority_accuracy, one_nn_accuracy, resample
from mlx_rft.timeseries.rows import SeriesPart, read_ts_jsonl, series_text, ucr_rows
from mlx_rft.timeseries.ucr import TSData, load_ucr, read_ts, ucr_dir, ucr_names

FIXTURES = Path(__file__).parent / "fixtures" / "ts"


def one_line_error(fn, *needles) -> str:
    """fn() raises MlxRftError with a one-line message that contains every needle."""
    with pytest.raises(MlxRftError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# The .ts reader on hand-written fixtures


def test_equal_length_univariate_fixture():
    data = read_ts(FIXTURES / "univariate.ts")
    assert data.name == "Tiny"
    assert data.classes == ("up", "down")
    assert data.labels == ("up", "down", "up")
    assert (data.channels, data.equal_length, data.has_missing) == (1, True, False)
    expected = [[[0.5, 1.0, 1.5, 2.0]], [[2.0, 1.5, 1.0, -0.5]], [[0.1, 2.5, -3.0, 4.0]]]
    assert len(data) == 3
    for got, want in zip(data.series, expected, strict=True):
        assert got.dtype == np.float32 and got.shape == (1, 4)
        np.testing.assert_array_equal(got, np.asarray(want, np.float32))


def test_variable_length_multichannel_fixture():
    data = read_ts(FIXTURES / "multichannel_varlen.ts")
    assert (data.name, data.channels, data.equal_length) == ("TwoChannel", 2, False)
    assert data.classes == ("a", "b", "c") and data.labels == ("b", "c")
    assert data.lengths == (3, 2)
    np.testing.assert_array_equal(data.series[0], [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(data.series[1], [[-1, 0], [0.25, 0.75]])


def test_missing_values_are_nan_and_recorded():
    data = read_ts(FIXTURES / "missing.ts")
    assert data.has_missing
    np.testing.assert_array_equal(data.series[0], [[1, np.nan, 3]])  # "?"
    np.testing.assert_array_equal(data.series[1], [[np.nan, 2, 3]])  # "NaN"


def test_malformed_fixtures_name_file_line_and_fix():
    one_line_error(
        lambda: read_ts(FIXTURES / "bad_channels.ts"),
        "bad_channels.ts:10:", "channel count is 1", "@dimensions says 2",
    )
    one_line_error(
        lambda: read_ts(FIXTURES / "bad_label.ts"),
        "bad_label.ts:9:", "label '3' is not one of the @classLabel labels (1, 2)",
        "add the label to the @classLabel line",
    )
    one_line_error(
        lambda: read_ts(FIXTURES / "timestamps.ts"),
        "timestamps.ts:2:", "@timeStamps true", "not supported", "re-save the data without",
    )


HEADER = "@problemName T\n@univariate true\n@equalLength true\n@seriesLength 3\n@classLabel true 1 2\n"


@pytest.mark.parametrize(
    "body, needles",
    [
        (HEADER + "@data\n1,2,3:1\n1,2:2\n", ("x.ts:8:", "length 2", "@seriesLength has 3")),
        ("@classLabel false\n@equalLength true\n@data\n1,2\n1\n", ("x.ts:5:", "length 1 but the first series (line 4) has 2")),
        (HEADER + "@data\n1,abc,3:1\n", ("x.ts:7:", "channel 1, value 2 ('abc') is not a number")),
        (HEADER + "@data\n1,2,3\n", ("x.ts:7:", "no label")),
        (HEADER + "@data\n1,1e39,3:1\n", ("x.ts:7:", "infinite")),
        (HEADER + "1,2,3:1\n", ("x.ts:6:", "before the @data line")),
        (HEADER, ("has no @data line",)),
        (HEADER + "@data\n", ("has no series after @data",)),
        ("@problemName T\n@classLabels true 1 2\n@data\n1:1\n", ("x.ts:2:", "unknown header tag @classLabels")),
        ("@classLabel true\n@data\n1:1\n", ("x.ts:1:", "needs the labels")),
        ("@classLabel\n@data\n1:1\n", ("x.ts:1:", "@classLabel needs true or false")),
        ("@classLabel false\n@univariate yes\n@data\n1\n", ("x.ts:2:", "@univariate needs true or false")),
        ("@univariate true\n@data\n1:1\n", ("x.ts has no @classLabel line", "@classLabel false")),
    ],
)
def test_ts_errors(tmp_path, body, needles):
    one_line_error(lambda: read_ts(write(tmp_path, "x.ts", body)), *needles)


def test_ts_without_labels_and_with_unequal_channels(tmp_path):
    data = read_ts(write(tmp_path, "u.ts", "@classLabel false\n@data\n1,2:3,4\n"))
    assert data.labels == ("",) and data.classes == () and data.channels == 2
    one_line_error(
        lambda: read_ts(write(tmp_path, "v.ts", "@classLabel false\n@data\n1,2:3\n")),
        "v.ts:3:", "channels have different lengths (1, 2)",
    )


# ---------------------------------------------------------------------------------------------
# The UCR/UEA sets shipped in the aeon wheel


def test_italy_power_demand():
    train, test = load_ucr("ItalyPowerDemand")
    assert (len(train), len(test)) == (67, 1029)
    assert set(train.lengths) == set(test.lengths) == {24}
    assert train.classes == ("1", "2") and train.channels == 1 and not train.has_missing
    assert train.name == test.name == "ItalyPowerDemand"


def test_multichannel_sets():
    basic, _ = load_ucr("BasicMotions")
    assert basic.channels == 6 and basic.series[0].shape == (6, 100)
    vowels, vowels_test = load_ucr("ucr:JapaneseVowels")  # the task name's prefix is accepted
    assert vowels.channels == vowels_test.channels == 12
    assert not vowels.equal_length and len(vowels.classes) == 9


def test_ucr_names_are_the_classification_sets_and_aeon_is_not_imported():
    names = ucr_names()
    assert {"ItalyPowerDemand", "GunPoint", "ArrowHead", "BasicMotions", "JapaneseVowels"} <= set(names)
    assert "Covid3Month" not in names  # a regression set (@targetLabel true)
    assert "aeon" not in sys.modules  # located on disk only; importing it would pull in sklearn etc.


def test_unknown_dataset_lists_the_shipped_ones():
    one_line_error(lambda: ucr_dir("NoSuchSet"), "unknown UCR/UEA dataset 'NoSuchSet'", "GunPoint")
    one_line_error(lambda: ucr_dir("../GunPoint"), "unknown UCR/UEA dataset")


def test_missing_aeon_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "aeon" else real(n, *a))
    one_line_error(lambda: ucr_names(), "pip install --no-deps aeon")


# ---------------------------------------------------------------------------------------------
# Baselines


@pytest.mark.parametrize(
    "name, published",  # the UCR archive's 1-NN Euclidean accuracy (1 - its published error)
    [("ItalyPowerDemand", 0.955), ("GunPoint", 0.913), ("ArrowHead", 0.800)],
)
def test_one_nn_matches_the_published_ucr_figure(name, published):
    train, test = load_ucr(name)
    assert abs(one_nn_accuracy(train, test) - published) < 0.005


def test_majority_accuracy():
    train, test = load_ucr("ItalyPowerDemand")
    majority = max(train.classes, key=train.labels.count)
    assert majority_accuracy(train, test) == test.labels.count(majority) / len(test)


def toy(series, labels, name="toy") -> TSData:
    series = tuple(np.asarray(s, np.float32) for s in series)
    return TSData(
        name, series, tuple(labels), tuple(sorted(set(labels))), series[0].shape[0],
        len({s.shape[1] for s in series}) == 1, any(np.isnan(s).any() for s in series),
    )


def test_one_nn_resamples_variable_length_series():
    np.testing.assert_allclose(resample(np.asarray([[0, 2]], np.float32), 5), [[0, 0.5, 1, 1.5, 2]])
    train = toy([[[0, 0, 0, 0, 0]], [[0, 1, 2, 3, 4]]], ["flat", "ramp"])
    test = toy([[[0, 4]], [[1, 1, 1]]], ["ramp", "flat"])  # resampled to length 5
    assert one_nn_accuracy(train, test) == 1.0
    assert majority_accuracy(train, test) == 0.5  # a tie goes to the first class: "flat"


def test_one_nn_refuses_missing_values():
    data = read_ts(FIXTURES / "missing.ts")
    one_line_error(lambda: one_nn_accuracy(data, data), "missing values", "interpolation")


# ---------------------------------------------------------------------------------------------
# Rows from UCR data


def test_ucr_rows_put_one_series_part_per_channel():
    rows = ucr_rows(read_ts(FIXTURES / "multichannel_varlen.ts"))
    assert [r.answer for r in rows] == ["b", "c"]
    intro, first, second = rows[1].parts
    assert intro == (
        "This is a time series from the TwoChannel dataset (2 channels). "
        "Which class is it? Answer with one of: a, b, c, inside <answer></answer> tags."
    )
    assert (first.name, second.name) == ("channel 1", "channel 2")
    np.testing.assert_array_equal(first.values, [[-1, 0]])
    np.testing.assert_array_equal(second.values, [[0.25, 0.75]])
    uni = ucr_rows(read_ts(FIXTURES / "univariate.ts"))[0]
    assert uni.parts[0].startswith("This is a time series from the Tiny dataset (1 channel). ")
    assert len(uni.series) == 1 and uni.series[0].values.shape == (1, 4)


def test_ucr_rows_refuse_missing_values():
    one_line_error(
        lambda: ucr_rows(read_ts(FIXTURES / "missing.ts")),
        "Gaps has missing values", "pick a dataset without missing values",
    )


# ---------------------------------------------------------------------------------------------
# Rows from user JSONL


def jsonl(tmp_path: Path, *rows) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    return write(tmp_path, "data.jsonl", "\n".join(lines) + "\n")


def row(series=(0.1, 0.2, 0.3), answer="walking", **piece):
    return {
        "prompt": ["The wrist accelerometer:", {"series": series, **piece}, "What is the person doing?"],
        "answer": answer,
    }


def test_jsonl_good_rows(tmp_path):
    np.save(tmp_path / "acc.npy", np.asarray([[1.0, 2.0], [3.0, 4.0]]))
    path = jsonl(
        tmp_path,
        row([[0.1, 0.2, 0.3], [1, 2, 3]], name="accelerometer"),
        "",  # blank lines are skipped
        row("acc.npy", answer="running"),
    )
    first, second = read_ts_jsonl(path)
    text, part, question = first.parts
    assert text == "The wrist accelerometer:" and question == "What is the person doing?"
    assert isinstance(part, SeriesPart) and part.name == "accelerometer"
    assert part.values.dtype == np.float32
    np.testing.assert_allclose(part.values, [[0.1, 0.2, 0.3], [1, 2, 3]])
    assert first.answer == "walking" and second.answer == "running"
    assert second.series[0].name == "series 1"  # the default name
    np.testing.assert_array_equal(second.series[0].values, [[1, 2], [3, 4]])
    one_d = read_ts_jsonl(jsonl(tmp_path, row([1, 2, 3])))[0].series[0].values
    assert one_d.shape == (1, 3)


@pytest.mark.parametrize(
    "bad, needles",
    [
        ('{"prompt": [', ("invalid JSON",)),
        ({"answer": "x"}, ('no "prompt"',)),
        ({"prompt": ["hi", {"series": [1]}]}, ('no "answer"',)),
        (row(answer="  "), ('"answer" is empty',)),
        (row(answer=3), ('"answer" is a int', 'write it as text')),
        (row([]), ("empty series",)),
        (row([[], []]), ("empty series",)),
        ('{"prompt": ["x", {"series": [1, NaN]}], "answer": "a"}', ("NaN or infinite",)),
        ('{"prompt": ["x", {"series": [1, 1e400]}], "answer": "a"}', ("NaN or infinite",)),
        (row([1, 10**400]), ("beyond float range",)),
        (row([1, "two"]), ('non-numeric value "two"',)),
        (row([1, True]), ("non-numeric value true",)),
        (row([[1, 2], [3]]), ("ragged 2-D array (channel lengths 1, 2)",)),
        (row([[1, 2], 3]), ("mixes numbers and lists",)),
        (row([[1, 2, 3], [4, 5, 6]]), ("wrong channel count", "2 channels", "the first row (line 1) has 1")),
        (row("nowhere.npy"), (".npy file 'nowhere.npy' is missing", "relative to the JSONL")),
        (row("text"), ("give a list of numbers or the path of a .npy file",)),
        (row([1], serie=[1]), ("unknown keys: serie",)),
        ({"prompt": ["only text"], "answer": "a"}, ("no {\"series\": ...} piece",)),
        ({"prompt": ["x", {"series": [1]}, {"series": [2]}], "answer": "a"}, ("2 series pieces",)),
        ([1, 2], ("is a JSON list",)),
    ],
)
def test_jsonl_errors(tmp_path, bad, needles):
    path = jsonl(tmp_path, row([1.0, 2.0, 3.0]), bad)
    one_line_error(lambda: read_ts_jsonl(path), "data.jsonl:2:", *needles)


def test_jsonl_missing_or_empty_file(tmp_path):
    one_line_error(lambda: read_ts_jsonl(tmp_path / "none.jsonl"), "does not exist")
    one_line_error(lambda: read_ts_jsonl(write(tmp_path, "e.jsonl", "\n")), "has no rows")


# ---------------------------------------------------------------------------------------------
# Series as text


def test_series_text():
    assert series_text(np.asarray([[0.1234, 0.98, -1.2833]])) == "0.12 0.98 -1.3"
    assert series_text(np.asarray([[1.0, -0.0001], [123.4, 0.0]])) == "1 -0.0001 | 120 0"
    assert series_text([5.5, 2], decimals=3) == "5.5 2"
    assert series_text(np.asarray([[-0.0, np.nan]])) == "0 NaN"


def test_series_text_of_a_real_row_stays_compact():
    train, _ = load_ucr("ItalyPowerDemand")
    values = ucr_rows(dataclasses.replace(train, series=train.series[:1], labels=train.labels[:1]))
    text = series_text(values[0].series[0].values)
    assert len(text.split()) == 24 and len(text) < 24 * 6
