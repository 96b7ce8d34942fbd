"""Create the team bucket on the S3-compatible store if it is missing (idempotent).

Run by the compose `bucket` service and the Kubernetes `make-bucket` Job, inside the liverseg image:
    AWS_ENDPOINT_URL=http://minio:9000 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \
        python deploy/make_bucket.py liverseg
The store may still be starting: connection errors are retried for `--wait` seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def ensure_bucket(name: str, wait_s: float = 120.0) -> bool:
    """Create bucket `name` unless it exists; True when it was created. Raises after `wait_s` seconds
    of connection errors, or on any other refusal (bad credentials, a name owned by someone else)."""
    import boto3
    from botocore.exceptions import ClientError, EndpointConnectionError

    s3 = boto3.client("s3")  # AWS_ENDPOINT_URL / AWS_* keys from the environment, as every client here
    deadline = time.monotonic() + wait_s
    while True:
        try:
            s3.head_bucket(Bucket=name)
            return False
        except EndpointConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)  # the store's pod or container is still starting
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
            s3.create_bucket(Bucket=name)
            return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bucket")
    ap.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the store to answer")
    args = ap.parse_args(argv)
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "AWS")
    try:
        created = ensure_bucket(args.bucket, args.wait)
    except Exception as e:
        print(f"bucket {args.bucket} at {endpoint}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"bucket {args.bucket} at {endpoint}: {'created' if created else 'exists'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
