"""CORRAL_JETSTREAM_REPLICAS: every stream and bucket Corral creates gets that many copies (3 on a
three-node cluster), and the audit stream's start-up update keeps it rather than scaling it down."""

from __future__ import annotations

from services.runtime.audit import STREAM_CONFIG, stream_config
from services.runtime.settings import jetstream_replicas


def test_one_copy_by_default_and_what_the_setting_says_otherwise(monkeypatch):
    monkeypatch.delenv("CORRAL_JETSTREAM_REPLICAS", raising=False)
    assert jetstream_replicas() == 1
    monkeypatch.setenv("CORRAL_JETSTREAM_REPLICAS", "3")
    assert jetstream_replicas() == 3
    config = stream_config(jetstream_replicas())
    assert config.num_replicas == 3
    assert (config.name, config.subjects, config.max_bytes) == (
        STREAM_CONFIG.name,
        STREAM_CONFIG.subjects,
        STREAM_CONFIG.max_bytes,
    )
