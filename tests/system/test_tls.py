"""Upstream TLS: the fake SugarCRM served over HTTPS with a private CA made by the openssl CLI.

Verification is on by default, `ca_file` trusts a private CA, and `verify_tls = false` works only
with a warning at every start.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.daemon import instance, sugarctl, write_config

from sugard.testing import FakeSugar

WARNING = "TLS verification is OFF (verify_tls = false)"


@pytest.mark.slow
def test_a_private_ca_is_refused_by_default_with_an_error_naming_ca_file(
    tls_fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """Without ca_file the site's certificate is not trusted: exit 6, a message naming ca_file,
    and the password never sent (no request reached the token endpoint)."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(tls_fake)}))
    result = sugarctl(daemon.socket, "token", "prod")
    assert 6 == result.returncode, result.stderr
    assert "not trusted" in result.stderr
    assert "set ca_file" in result.stderr
    assert 0 == tls_fake.calls["token"]
    status = json.loads(sugarctl(daemon.socket, "status", "prod", "--json").stdout)
    assert "failed" == status["state"]


@pytest.mark.slow
def test_ca_file_trusts_a_private_ca(
    tls_fake: FakeSugar, certs: dict[str, Path], short_dir: Path, start_daemon
) -> None:
    """With ca_file set to the private CA, the daemon logs in over verified TLS."""
    config = write_config(short_dir, {"prod": instance(tls_fake, ca_file=str(certs["ca"]))})
    daemon = start_daemon(config)
    result = sugarctl(daemon.socket, "token", "prod")
    assert 0 == result.returncode, result.stderr
    assert tls_fake.valid(result.stdout.strip())
    assert WARNING not in daemon.log()


def test_a_bad_ca_file_fails_the_instance_not_the_daemon(
    tls_fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """A ca_file that does not exist fails that instance with a message naming it; the daemon
    runs on and serves the other instances."""
    missing = short_dir / "no-such-ca.pem"
    tls_fake.set_password("bob", "bob-secret-pw")
    config = write_config(
        short_dir,
        {
            "prod": instance(tls_fake, ca_file=str(missing)),
            "lab": instance(tls_fake, username="bob", password="bob-secret-pw", verify_tls=False),
        },
    )
    daemon = start_daemon(config)
    result = sugarctl(daemon.socket, "token", "prod")
    assert 6 == result.returncode, result.stderr
    assert f"ca_file {missing} does not exist" in result.stderr
    assert 0 == sugarctl(daemon.socket, "token", "lab").returncode
    assert "Traceback" not in daemon.log()


@pytest.mark.slow
def test_verify_tls_false_works_with_a_warning_at_every_start(
    tls_fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """verify_tls = false gets a token, and each start (and a reload that adds such an
    instance) logs the warning again."""
    config = write_config(short_dir, {"prod": instance(tls_fake, verify_tls=False)})
    for _ in range(2):
        daemon = start_daemon(config)
        result = sugarctl(daemon.socket, "token", "prod")
        assert 0 == result.returncode, result.stderr
        assert 1 == daemon.log().count(f"prod: {WARNING}")
        daemon.stop()
    daemon = start_daemon(config)
    tls_fake.set_password("bob", "bob-secret-pw")
    write_config(
        short_dir,
        {
            "prod": instance(tls_fake, verify_tls=False),
            "lab": instance(tls_fake, username="bob", password="bob-secret-pw", verify_tls=False),
        },
    )
    assert 0 == sugarctl(daemon.socket, "reload").returncode
    assert 1 == daemon.log().count(f"lab: {WARNING}")


def test_an_https_url_on_a_plain_http_port_says_the_site_does_not_speak_tls_there(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """https:// to a port that answers plain HTTP: the error says the site does not speak TLS
    on that port (not OpenSSL's WRONG_VERSION_NUMBER), in sugarctl's line and the status."""
    https = fake.url.replace("http://", "https://")
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake, url=https)}))
    result = sugarctl(daemon.socket, "token", "prod", "--wait", "1")
    assert 5 == result.returncode, result.stderr
    assert "the site does not speak TLS on that port" in result.stderr
    assert "WRONG_VERSION_NUMBER" not in result.stderr
    status = json.loads(sugarctl(daemon.socket, "status", "prod", "--json").stdout)
    assert f"cannot reach {https}: the site does not speak TLS" in status["last_error"]["message"]
