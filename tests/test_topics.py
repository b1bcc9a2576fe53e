"""Topic names: ``sidetune/v1/{device_id}/{kind}``, built and parsed by schemas.topics only."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import KINDS, Topic, WireError, subscription, topic
from schemas.topics import DEVICE_ID_PATTERN, DOWNLINK_KINDS, PREFIX, UPLINK_KINDS

#: Runs with the edge extra alone (no torch, no redis): the board's Python 3.10 CI step too.
pytestmark = pytest.mark.edge

device_ids = st.from_regex(DEVICE_ID_PATTERN, fullmatch=True)


def test_kinds_are_the_protocol_table():
    assert set(KINDS) == {"jobs", "cache", "activations", "progress", "adapter", "errors", "status", "updates"}
    assert set(UPLINK_KINDS) | set(DOWNLINK_KINDS) == set(KINDS)
    assert not set(UPLINK_KINDS) & set(DOWNLINK_KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_build_and_parse(kind):
    t = topic("board-7", kind)
    assert t == f"sidetune/v1/board-7/{kind}"
    assert Topic.parse(t) == Topic("board-7", kind)
    assert str(Topic.parse(t)) == t


@given(device=device_ids, kind=st.sampled_from(KINDS))
def test_build_parse_round_trip(device, kind):
    t = topic(device, kind)
    assert t.startswith(PREFIX + "/")
    parsed = Topic.parse(t)
    assert (parsed.device_id, parsed.kind) == (device, kind)
    assert str(parsed) == t


@pytest.mark.parametrize("device", ["dev-a", "A", "0", "x" * 64, "board_7", "Dev-9_x"])
def test_good_device_ids(device):
    assert Topic.parse(topic(device, "jobs")).device_id == device


@pytest.mark.parametrize("device", [
    "", "-dev", "_dev", "x" * 65, "dev a", "dev/a", "dev+", "dev#", "+", "#", "dév", "dev.a",
    "dev\n", "dev\x00", "$SYS",
])
def test_bad_device_ids_are_rejected(device):
    with pytest.raises(WireError, match="bad device id") as e:
        topic(device, "jobs")
    assert e.value.code == "bad_topic"


def test_device_id_must_be_a_string():
    with pytest.raises(WireError, match="bad device id") as e:
        Topic(7, "jobs")  # type: ignore[arg-type]
    assert e.value.code == "bad_topic"


@pytest.mark.parametrize("kind", ["job", "JOBS", "", "weights", "jobs/x", "+", "#"])
def test_unknown_kinds_are_rejected(kind):
    with pytest.raises(WireError, match="unknown message kind") as e:
        topic("board-7", kind)
    assert e.value.code == "bad_topic"
    assert "jobs" in str(e.value)  # lists the known kinds


@pytest.mark.parametrize("bad", [
    "", "sidetune", "sidetune/v1", "sidetune/v1/board-7", "sidetune/v2/board-7/jobs",
    "other/v1/board-7/jobs", "sidetune/v1/board-7/jobs/extra", "/sidetune/v1/board-7/jobs",
    "sidetune/v1//jobs", "sidetune/v1/+/jobs", "sidetune/v1/board-7/#", "$share/g/sidetune/v1/board-7/jobs",
])
def test_parse_rejects_malformed_topics(bad):
    with pytest.raises(WireError) as e:
        Topic.parse(bad)
    assert e.value.code == "bad_topic"
    assert isinstance(e.value, ValueError)


def test_parse_says_what_form_is_expected():
    with pytest.raises(WireError, match=r"not of the form sidetune/v1/<device_id>/<kind>"):
        Topic.parse("sidetune/v1/board-7")
    with pytest.raises(WireError, match="unknown message kind 'weights'"):
        Topic.parse("sidetune/v1/board-7/weights")
    with pytest.raises(WireError, match="bad device id"):
        Topic.parse("sidetune/v1/-x/jobs")


@pytest.mark.parametrize("value", [None, b"sidetune/v1/board-7/jobs", 42, ["sidetune"]])
def test_parse_rejects_non_strings(value):
    with pytest.raises(WireError, match="topic must be a string") as e:
        Topic.parse(value)  # type: ignore[arg-type]
    assert e.value.code == "bad_topic"


def test_parse_truncates_huge_topics_in_the_message():
    with pytest.raises(WireError) as e:
        Topic.parse("x" * 100_000)
    assert len(str(e.value)) < 500


def test_topic_is_frozen_and_hashable():
    t = Topic("board-7", "jobs")
    assert {t: 1}[Topic("board-7", "jobs")] == 1
    with pytest.raises(AttributeError):
        t.kind = "cache"  # type: ignore[misc]


def test_subscription_all_devices():
    assert subscription("jobs") == "sidetune/v1/+/jobs"
    assert subscription("adapter", "board-7") == "sidetune/v1/board-7/adapter"


@pytest.mark.parametrize("kind", UPLINK_KINDS)
def test_shared_subscription(kind):
    assert subscription(kind, share_group="workers") == f"$share/workers/sidetune/v1/+/{kind}"
    flt = subscription(kind, share_group="workers")
    # the filter after the share prefix is a plain filter that matches real topics of every device
    group, plain = flt.split("/", 2)[1:]
    assert group == "workers"
    assert plain.replace("+", "dev-a") == topic("dev-a", kind)


def test_subscription_rejects_unknown_kind():
    with pytest.raises(WireError, match="unknown message kind 'nope'") as e:
        subscription("nope", share_group="workers")
    assert e.value.code == "bad_topic"
