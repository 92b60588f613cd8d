"""Environment switches are parsed one way (asectl.environment.env_flag) by every reader."""

import pytest

from asectl.environment import env_flag


@pytest.mark.parametrize(
    "value, on",
    [
        ("1", True),
        (" Yes ", True),
        ("TRUE", True),
        ("on", True),
        ("0", False),
        ("off", False),
        ("", False),
        ("no", False),
        ("2", False),
    ],
)
def test_env_flag_words(monkeypatch, value, on):
    monkeypatch.setenv("ASECTL_TEST_FLAG", value)
    assert env_flag("ASECTL_TEST_FLAG") is on


def test_env_flag_unset_is_off_and_hf_offline_reads_it(monkeypatch):
    from asectl.backends.encoders import hf_offline

    monkeypatch.delenv("ASECTL_TEST_FLAG", raising=False)
    assert env_flag("ASECTL_TEST_FLAG") is False
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert hf_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "off")
    assert not hf_offline()
