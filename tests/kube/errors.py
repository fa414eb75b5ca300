"""Failures as kube-apiserver words them (a `Status` body with a code and a reason)."""

from __future__ import annotations

import kmock

from .resources import Served


def status_error(code: int, reason: str, message: str, **details: object) -> kmock.KubernetesError:
    """An error kmock renders as a Kubernetes `Status` with this code, reason and message."""
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details)


def not_found(served: Served | None = None, name: str | None = None) -> kmock.KubernetesError:
    """404: the object `name` of `served`; without a name, an unknown path."""
    if served is None or name is None:
        return status_error(404, "NotFound", "the server could not find the requested resource")
    return status_error(
        404,
        "NotFound",
        f'{served.qualified} "{name}" not found',
        name=name,
        group=served.group,
        kind=served.plural,
    )


def already_exists(served: Served, name: str) -> kmock.KubernetesError:
    return status_error(
        409,
        "AlreadyExists",
        f'{served.qualified} "{name}" already exists',
        name=name,
        group=served.group,
        kind=served.plural,
    )


def conflict(served: Served, name: str, why: str | None = None) -> kmock.KubernetesError:
    why = why or (
        "the object has been modified; please apply your changes to the latest version and "
        "try again"
    )
    return status_error(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {served.qualified} "{name}": {why}',
        name=name,
        group=served.group,
        kind=served.plural,
    )


def invalid(served: Served, name: str, problems: list[str]) -> kmock.KubernetesError:
    """422 Invalid; each problem is `<field>: <message>`, as in fedrun_render.admission."""
    listed = problems[0] if len(problems) == 1 else f"[{', '.join(problems)}]"
    group = f".{served.group}" if served.group else ""
    causes = [
        {"reason": "FieldValueInvalid", "field": field, "message": message or field}
        for field, _, message in (p.partition(": ") for p in problems)
    ]
    return status_error(
        422,
        "Invalid",
        f'{served.kind}{group} "{name}" is invalid: {listed}',
        name=name,
        group=served.group,
        kind=served.kind,
        causes=causes,
    )


def bad_request(message: str) -> kmock.KubernetesError:
    return status_error(400, "BadRequest", message)


def unsupported_media_type(content_type: str) -> kmock.KubernetesError:
    return status_error(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format ({content_type or 'none'}) - accepted "
        "media types include: application/json-patch+json, application/merge-patch+json",
    )


def method_not_allowed(verb: str) -> kmock.KubernetesError:
    return status_error(405, "MethodNotAllowed", f"the server does not allow this method ({verb})")
