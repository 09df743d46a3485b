"""rate_limit and rate_wait: in [defaults] or an instance, checked as numbers naming the key,
SugarCloud sites limited to 15 requests a second unless the config says otherwise, and the
effective value shown by `sugard show-config`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support.daemon import SUGARD

from sugard.config import ConfigError, load_config

CLOUD = "https://acme.sugarondemand.com"
OWN = "https://crm.example.com"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def instance(name: str, url: str, extra: str = "") -> str:
    return f'[instances.{name}]\nurl = "{url}"\nusername = "u"\npassword = "p"\n{extra}'


def test_sugarcloud_sites_get_15_per_second_and_others_no_limit(tmp_path: Path) -> None:
    """Not given: 15 for *.sugarondemand.com (any case, with a port), 0 for any other site;
    rate_wait 30 s for both."""
    path = write(
        tmp_path,
        instance("cloud", CLOUD)
        + instance("upper", "https://ACME2.SugarOnDemand.com:443/")
        + instance("own", OWN)
        + instance("lookalike", "https://sugarondemand.com.evil.example"),
    )
    config = load_config(path, {})
    assert {"cloud": 15.0, "upper": 15.0, "own": 0.0, "lookalike": 0.0} == {
        name: i.rate_limit for name, i in config.instances.items()
    }
    assert {30.0} == {i.rate_wait for i in config.instances.values()}


def test_the_config_overrides_the_sugarcloud_default(tmp_path: Path) -> None:
    """A rate_limit in [defaults] or the instance wins over the SugarCloud default, 0 too."""
    path = write(
        tmp_path,
        "[defaults]\nrate_limit = 5\nrate_wait = 2.5\n"
        + instance("cloud", CLOUD)
        + instance("off", CLOUD.replace("acme", "b"), "rate_limit = 0\n")
        + instance("own", OWN, "rate_limit = 40\n"),
    )
    config = load_config(path, {})
    assert {"cloud": 5.0, "off": 0.0, "own": 40.0} == {
        name: i.rate_limit for name, i in config.instances.items()
    }
    assert 2.5 == config.instances["own"].rate_wait


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("rate_limit = -1", "instances.prod.rate_limit: must be between 0 and 100000, not -1"),
        ('rate_limit = "fast"', "instances.prod.rate_limit: must be a number, not a string"),
        (
            'rate_limit = "20"',
            "instances.prod.rate_limit: must be a number, not a string; write 20",
        ),
        ("rate_wait = -0.5", "instances.prod.rate_wait: must be between 0 and 3600, not -0.5"),
    ],
)
def test_a_rate_that_is_negative_or_not_a_number_is_an_error_naming_the_key(
    tmp_path: Path, line: str, said: str
) -> None:
    """A negative rate, or one that is not a number, is a config error naming file and key."""
    path = write(tmp_path, instance("prod", OWN, line + "\n"))
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert [f"{path}: {said}"] == [str(p)[: len(f"{path}: {said}")] for p in caught.value.problems]


def test_show_config_shows_the_effective_rate_limit(tmp_path: Path) -> None:
    """`sugard show-config --json` shows 15 for a SugarCloud site nobody configured."""
    path = write(tmp_path, instance("cloud", CLOUD) + instance("own", OWN))
    shown = subprocess.run(
        [SUGARD, "show-config", "-c", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    instances = json.loads(shown.stdout)["instances"]
    assert (15.0, 30.0) == (instances["cloud"]["rate_limit"], instances["cloud"]["rate_wait"])
    assert 0.0 == instances["own"]["rate_limit"]
