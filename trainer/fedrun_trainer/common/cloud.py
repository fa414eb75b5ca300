"""S3 clients whose credentials come from configuration, never from a guess on the network.

boto3's default credential chain ends by asking the EC2 instance metadata service
(169.254.169.254). Off EC2 that costs seconds of timeouts before "Unable to locate
credentials", and it sends traffic off the machine; in a fedrun pod it is never needed,
because a hospital's pod gets its role through IRSA (a web-identity token named by the
pod's environment) or EKS Pod Identity (the container provider, also named by the
environment). So :func:`s3_client` drops that last step unless the user asks for it with
the AWS SDK's own switch, ``AWS_EC2_METADATA_DISABLED=false``, and fails at once with
:class:`NoCloudCredentialsError` when nothing else is configured.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["IMDS_SWITCH", "NoCloudCredentialsError", "s3_client"]

#: The AWS SDKs' switch for the instance metadata service; fedrun reads "false" as consent.
IMDS_SWITCH = "AWS_EC2_METADATA_DISABLED"


class NoCloudCredentialsError(RuntimeError):
    """No AWS credentials are configured for this process (the message says where to put them)."""


def _instance_metadata_allowed() -> bool:
    return os.environ.get(IMDS_SWITCH, "").strip().lower() == "false"


def s3_client(uri: str) -> Any:
    """A boto3 S3 client for reading or writing ``uri``, or :class:`NoCloudCredentialsError`.

    Credentials come from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, IRSA's
    ``AWS_ROLE_ARN`` and ``AWS_WEB_IDENTITY_TOKEN_FILE``, the container provider's
    ``AWS_CONTAINER_CREDENTIALS_*``), the shared config and credentials files, SSO or a
    credential process; the instance metadata service only with
    ``AWS_EC2_METADATA_DISABLED=false``. Nothing here opens a connection: the check reads
    files and the environment only.
    """
    import boto3
    import botocore.session

    session = botocore.session.Session()
    if not _instance_metadata_allowed():
        session.get_component("credential_provider").remove("iam-role")
    if session.get_credentials() is None:
        raise NoCloudCredentialsError(
            f"{uri}: no AWS credentials are configured: set AWS_PROFILE or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY here, or run in a pod whose "
            "ServiceAccount has an IRSA role; fedrun does not ask the EC2 instance metadata "
            f"service unless {IMDS_SWITCH}=false"
        )
    return boto3.Session(botocore_session=session).client("s3")
