"""Issue 16, "Real components in tests and CI": the harness starts a real PostgreSQL and a
real SeaweedFS S3 endpoint the way a deployment should run them, and the fixtures hand out
fresh databases and buckets.

- PostgreSQL: TLS verified (``sslmode=verify-full`` to 127.0.0.1), SCRAM password from the
  0600 file or the libpq passfile; a plain TCP connection is refused (hostssl only), a wrong
  password and an unknown CA too; the Unix socket in the directory works.
- S3: signed requests over verified TLS put, get and list; anonymous requests and plain
  HTTP are refused; a stopped endpoint starts again with its objects.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness.postgres import PostgresDatabase, PostgresServer
from tests.harness.seaweed import S3Bucket, S3Server


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.postgres
def test_postgres_verify_full_with_password_file(postgres_server: PostgresServer) -> None:
    assert "sslmode=verify-full" in postgres_server.url
    assert "@127.0.0.1:" in postgres_server.url and ":" not in postgres_server.url.split("@")[0][
        len("postgresql://"):]  # no password in the URL
    assert _mode(postgres_server.password_file) == 0o600
    assert _mode(postgres_server.passfile) == 0o600
    with postgres_server.connect() as conn:
        ssl, version = conn.execute(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() or (
            None, None)
        assert ssl is True
        assert version in ("TLSv1.2", "TLSv1.3")
        assert conn.execute("SELECT current_user").fetchone() == ("pacsvault",)


@pytest.mark.postgres
def test_postgres_passfile_and_socket(postgres_server: PostgresServer) -> None:
    import psycopg

    # libpq's passfile: no password handed over by the caller at all
    with psycopg.connect(postgres_server.url, passfile=str(postgres_server.passfile)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(host=str(postgres_server.socket_dir), port=postgres_server.port,
                         dbname=postgres_server.database, user=postgres_server.user,
                         passfile=str(postgres_server.passfile)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.postgres
def test_postgres_refuses_plain_tcp_bad_password_unknown_ca(
        postgres_server: PostgresServer) -> None:
    import psycopg

    common: dict[str, Any] = {"host": "127.0.0.1", "port": postgres_server.port,
              "dbname": postgres_server.database, "user": postgres_server.user,
              "connect_timeout": 10}
    with pytest.raises(psycopg.OperationalError, match=r"no pg_hba\.conf entry.*no encryption"):
        psycopg.connect(**common, password=postgres_server.password(), sslmode="disable")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**common, password="not-the-password", sslmode="verify-full",
                        sslrootcert=str(postgres_server.ca_file))
    system_cas = "/etc/ssl/certs/ca-certificates.crt"
    if Path(system_cas).exists():
        with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
            psycopg.connect(**common, password=postgres_server.password(),
                            sslmode="verify-full", sslrootcert=system_cas)


@pytest.mark.postgres
def test_postgres_db_is_fresh_and_separate(postgres_db: PostgresDatabase) -> None:
    assert postgres_db.name in postgres_db.url and "sslmode=verify-full" in postgres_db.url
    with postgres_db.connect() as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (postgres_db.name,)
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                            ).fetchone() == (0,)
        conn.execute("CREATE TABLE t (marker text)")
        conn.execute("INSERT INTO t VALUES ('harness-dump-marker')")
    dump = postgres_db.server.dump(postgres_db.name)
    assert b"CREATE TABLE public.t" in dump and b"harness-dump-marker" in dump


@pytest.mark.s3
def test_s3_put_get_list_signed(s3_bucket: S3Bucket) -> None:
    server = s3_bucket.server
    assert server.endpoint.startswith("https://127.0.0.1:")
    assert _mode(server.credentials_file) == 0o600
    client = s3_bucket.client()
    assert client.list_objects_v2(Bucket=s3_bucket.name).get("KeyCount") == 0
    body = bytes(range(256)) * 64
    client.put_object(Bucket=s3_bucket.name, Key="objects/ab/cdef", Body=body)
    assert client.get_object(Bucket=s3_bucket.name, Key="objects/ab/cdef")["Body"].read() == body
    listing = client.list_objects_v2(Bucket=s3_bucket.name, Prefix="objects/")
    assert [o["Key"] for o in listing["Contents"]] == ["objects/ab/cdef"]


@pytest.mark.s3
def test_s3_refuses_anonymous_and_plain_http(s3_bucket: S3Bucket) -> None:
    import httpx
    from botocore.exceptions import ClientError

    s3_bucket.client().put_object(Bucket=s3_bucket.name, Key="k", Body=b"secret")
    anonymous = s3_bucket.server.client(anonymous=True)
    calls: list[Callable[[], object]] = [
        lambda: anonymous.list_objects_v2(Bucket=s3_bucket.name),
        lambda: anonymous.get_object(Bucket=s3_bucket.name, Key="k"),
        lambda: anonymous.put_object(Bucket=s3_bucket.name, Key="x", Body=b"x")]
    for call in calls:
        with pytest.raises(ClientError) as err:
            call()
        assert err.value.response["Error"]["Code"] == "AccessDenied"
    # plain HTTP to the S3 port: no S3 answer at all (the listener speaks TLS only)
    plain = httpx.get(f"http://127.0.0.1:{s3_bucket.server.port}/{s3_bucket.name}/k",
                      timeout=10)
    assert plain.status_code == 400 and b"secret" not in plain.content
    assert [o["Key"] for o in s3_bucket.client().list_objects_v2(
        Bucket=s3_bucket.name)["Contents"]] == ["k"]


@pytest.mark.s3
def test_s3_unknown_ca_refused(s3_server: S3Server) -> None:
    import boto3
    from botocore.exceptions import SSLError

    access, secret = s3_server.credentials()
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name=s3_server.region,
                          aws_access_key_id=access, aws_secret_access_key=secret,
                          verify="/etc/ssl/certs/ca-certificates.crt")
    if not Path("/etc/ssl/certs/ca-certificates.crt").exists():
        pytest.skip("no system CA bundle to try")
    with pytest.raises(SSLError):
        client.list_buckets()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.s3
def test_restart_keeps_data_port_and_credentials() -> None:
    """What the "PostgreSQL restarted / S3 endpoint down" tests rely on: ``stop`` then
    ``start`` on the same directory gives the same port, password and keys, and the data."""
    from tests.harness.components import require
    from tests.harness.postgres import postgres_missing, running_postgres
    from tests.harness.seaweed import running_seaweed, seaweed_missing

    require(postgres_missing())
    require(seaweed_missing())
    with running_postgres() as pg, running_seaweed() as s3:
        with pg.connect() as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        s3.client().put_object(Bucket=s3.bucket, Key="kept", Body=b"still here")
        pg.stop()
        s3.stop()
        import psycopg

        with pytest.raises(psycopg.OperationalError):
            pg.connect(connect_timeout=5)
        again, s3_again = pg.start(), s3.start()
        assert (again.port, again.url, again.password()) == (pg.port, pg.url, pg.password())
        assert again.pid != pg.pid and s3_again.pid != s3.pid
        with again.connect() as conn:
            assert conn.execute("SELECT x FROM kept").fetchone() == (42,)
        assert (s3_again.endpoint, s3_again.credentials()) == (s3.endpoint, s3.credentials())
        assert s3_again.client().get_object(Bucket=s3.bucket, Key="kept")["Body"].read() == (
            b"still here")


def test_missing_component_skips_locally_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.harness.components import require

    require(None)  # present: nothing happens
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require("X is not installed")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required under CI"):
        require("X is not installed")
