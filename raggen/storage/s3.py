"""S3 settings and clients (boto3 and pyarrow) from explicit options or the standard AWS environment."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Options:
    """How to reach S3; every ``None`` falls back to the standard AWS environment / config files."""

    endpoint_url: str | None = None
    region_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    max_attempts: int | None = None  # total attempts per request, first try included (default 5)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    @classmethod
    def coerce(cls, value: S3Options | Mapping[str, Any] | None) -> S3Options:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"s3_options: unknown field(s) {sorted(unknown)}")
        return cls(**dict(value))

    def resolved(self) -> S3Options:
        """Fill the unset fields from the AWS environment (what boto3 would pick up itself)."""
        env = os.environ
        attempts = self.max_attempts or int(env.get("AWS_MAX_ATTEMPTS", "5"))
        return S3Options(
            endpoint_url=self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region_name=self.region_name or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            aws_access_key_id=self.aws_access_key_id or env.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=self.aws_secret_access_key or env.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=self.aws_session_token or env.get("AWS_SESSION_TOKEN"),
            max_attempts=attempts,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def s3_client(options: S3Options | Mapping[str, Any] | None = None):
    """A boto3 S3 client with explicit endpoint/region/credentials and botocore standard retries."""
    import boto3
    from botocore.config import Config

    opts = S3Options.coerce(options).resolved()
    config = Config(
        # total attempts, first try included (what AWS_MAX_ATTEMPTS means); botocore's own
        # ``max_attempts`` key counts retries only
        retries={"total_max_attempts": opts.max_attempts, "mode": "standard"},
        connect_timeout=opts.connect_timeout,
        read_timeout=opts.read_timeout,
        s3={"addressing_style": "path"} if opts.endpoint_url else None,
    )
    return boto3.client(
        "s3",
        endpoint_url=opts.endpoint_url,
        region_name=opts.region_name or "us-east-1",
        aws_access_key_id=opts.aws_access_key_id,
        aws_secret_access_key=opts.aws_secret_access_key,
        aws_session_token=opts.aws_session_token,
        config=config,
    )


def pyarrow_s3_filesystem(options: S3Options | Mapping[str, Any] | None = None):
    """The same S3 settings as a ``pyarrow.fs.S3FileSystem`` (what Ray Data's readers take)."""
    from pyarrow import fs

    opts = S3Options.coerce(options).resolved()
    kwargs: dict[str, Any] = {
        "region": opts.region_name or "us-east-1",
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=opts.max_attempts or 5),
        "connect_timeout": opts.connect_timeout,
        "request_timeout": opts.read_timeout,
    }
    if opts.aws_access_key_id and opts.aws_secret_access_key:
        kwargs.update(access_key=opts.aws_access_key_id, secret_key=opts.aws_secret_access_key)
        if opts.aws_session_token:
            kwargs["session_token"] = opts.aws_session_token
    if opts.endpoint_url:
        scheme, _, host = opts.endpoint_url.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/") if host else scheme, scheme=scheme if host else "https")
    return fs.S3FileSystem(**kwargs)
