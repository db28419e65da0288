"""Credentials never leave the config: one place that knows what a credential looks like.

Storage credentials reach the project three ways: as `storage_options` entries (top level, per
input, nested in `client_kwargs` / `config_kwargs` / ...), embedded in a URI
(`s3://KEY:SECRET@bucket/...`), or from where fsspec / botocore find them without us (environment,
`~/.aws` profiles, instance roles; nothing to redact there). Everything the project writes or prints
goes through one of:

- `redact(obj)`: a JSON-like structure (manifest, marker, config) with the values of credential-like
  names inside every `storage_options` mapping replaced by REDACTED, credentials in URIs replaced,
  and any known secret value masked in every string;
- `scrub(text)`: free text (progress lines, error messages, tracebacks, HTML);
- `without_credentials(obj)`: the same structure with credentials removed, for identities and
  hashes (a rotated key is the same job).

Credentials in URIs are moved into the options when a config is parsed (`lift_config_uris`,
`lift_input_uris`), so recorded paths never carry them. Users can name further credential options
with `storage_options: {redact_keys: [name, ...]}`; pipeline.storage removes that entry before
the options reach fsspec.

No file or network access and no project imports: the configs, pipeline.storage and the jobs call it.
"""

from __future__ import annotations

import re
import sys
import traceback
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus, unquote

REDACTED = "REDACTED"
STORAGE_OPTIONS = "storage_options"  # the mapping name under which credentials are looked for
REDACT_KEYS = "redact_keys"  # storage option: further names to treat as credentials

# Credential-like option names (compared lower-case, '-' as '_'): fsspec's s3fs / gcsfs / adlfs and
# botocore's client arguments, and generic ones.
CREDENTIAL_NAMES = frozenset(
    {
        "key",
        "secret",
        "token",
        "session_token",
        "password",
        "passwd",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "access_key",
        "secret_key",
        "access_key_id",
        "secret_access_key",
        "security_token",
        "account_key",
        "sas_token",
        "connection_string",
        "client_secret",
        "credential",
        "credentials",
        "api_key",
        "sse_customer_key",
        "ssecustomerkey",
        "authorization",
        "auth_token",
        "refresh_token",
        "private_key",
    }
)

# Known secret values are masked in free text only when at least this long: a short value
# ("test", a one-letter password) would mask ordinary words everywhere.
MIN_KNOWN_VALUE_LEN = 8

# `scheme://user@` or `scheme://user:password@`. The password may hold a raw '/' (AWS secret keys
# do, and people paste them unescaped); it ends at the first '@'. A path with '@' in it
# (`s3://bucket/a@b`) is no userinfo: the part before ':' or '@' may not contain '/'.
_URI_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s'\":]+(?::[^@\s'\"]*?)?)@")
_NAME_ALT = "|".join(sorted((re.escape(n) for n in CREDENTIAL_NAMES), key=len, reverse=True))
# `name: value`, `name=value`, `'name': 'value'` in free text (YAML errors quote the offending line,
# reprs of option dicts, botocore messages).
_NAME_VALUE = re.compile(
    r"(?P<name>(?<![A-Za-z0-9_])['\"]?(?:" + _NAME_ALT + r")['\"]?\s*[:=]\s*)"
    r"(?P<value>'[^']*'|\"[^\"]*\"|[^\s,;}\]\)]+)",
    re.IGNORECASE,
)

_known_values: set[str] = set()
_known_longest_first: tuple[str, ...] = ()  # masking order: a value inside a longer one goes second


def _norm(name: Any) -> str:
    return str(name).lower().replace("-", "_")


def credential_names(options: Any = None, extra: Iterable[str] = ()) -> frozenset[str]:
    """The default names, plus those listed under `redact_keys` anywhere in `options`, plus extra."""
    names = set(CREDENTIAL_NAMES) | {_norm(n) for n in extra}

    def collect(o):
        if isinstance(o, dict):
            listed = o.get(REDACT_KEYS)
            if isinstance(listed, (list, tuple)):
                names.update(_norm(n) for n in listed)
            elif isinstance(listed, str):
                names.add(_norm(listed))
            for v in o.values():
                collect(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                collect(v)

    collect(options)
    return frozenset(names)


# ---- URIs ------------------------------------------------------------------------------------


def split_uri_credentials(uri: str) -> tuple[str, dict]:
    """`s3://KEY:SECRET@bucket/p` -> (`s3://bucket/p`, {"key": KEY, "secret": SECRET}); a URI without
    userinfo comes back unchanged with {}. Percent-escapes in the userinfo are decoded."""
    if not isinstance(uri, str):
        return uri, {}
    m = _URI_USERINFO.match(uri)
    if not m:
        return uri, {}
    user, _, password = m.group("userinfo").partition(":")
    creds = {"key": unquote(user)}
    if password:
        creds["secret"] = unquote(password)
    return m.group("scheme") + uri[m.end() :], creds


def redact_uri(uri: str) -> str:
    """Every `scheme://userinfo@` in a string becomes `scheme://REDACTED@`."""
    return _URI_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", uri)


def strip_uri_credentials(text: str) -> str:
    """Every `scheme://userinfo@` in a string becomes `scheme://` (for identities)."""
    return _URI_USERINFO.sub(lambda m: m.group("scheme"), text)


# ---- mappings and whole artifacts -----------------------------------------------------------


def _is_credential(name: Any, names: frozenset[str]) -> bool:
    return _norm(name) in names


def _walk(obj: Any, names: frozenset[str], in_options: bool, drop: bool, mask_known: bool) -> Any:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if in_options and _is_credential(k, names):
                if drop:
                    continue
                out[k] = v if v is None or (isinstance(v, str) and not v) else REDACTED  # "none given" stays visible
            elif in_options and k == REDACT_KEYS and drop:
                continue  # which names are secret does not change what a job computes
            else:
                out[k] = _walk(v, names, in_options or k == STORAGE_OPTIONS, drop, mask_known)
        return out
    if isinstance(obj, (list, tuple)):
        return [_walk(v, names, in_options, drop, mask_known) for v in obj]
    if isinstance(obj, str):
        if drop:
            return strip_uri_credentials(obj)
        text = redact_uri(obj)
        return _mask_known(text) if mask_known else text
    return obj


def redact(obj: Any, extra: Iterable[str] = ()) -> Any:
    """A JSON-like artifact with the credential-like values of every `storage_options` mapping in it
    (at any depth below it) replaced by REDACTED, credentials in URIs replaced and known secret values
    masked in every string. None and empty values stay: they say no credential was given. A copy."""
    names = credential_names(obj, extra)
    return _walk(obj, names, False, drop=False, mask_known=True)


def without_credentials(obj: Any, extra: Iterable[str] = ()) -> Any:
    """The artifact with credential entries (and `redact_keys`) removed from every `storage_options`
    mapping and userinfo removed from URIs: what identifies a job, independent of its credentials."""
    names = credential_names(obj, extra)
    return _walk(obj, names, False, drop=True, mask_known=False)


def inline_credentials(obj: Any, extra: Iterable[str] = ()) -> list[str]:
    """Where a config carries credentials itself (`storage_options.key`, `inputs[0].storage_options.secret`,
    ...), for a warning: they are redacted everywhere, but the config file still holds them."""
    names, found = credential_names(obj, extra), []

    def walk(o, where: str, in_options: bool):
        if isinstance(o, dict):
            for k, v in o.items():
                here = f"{where}.{k}" if where else str(k)
                if in_options and _is_credential(k, names):
                    if v not in (None, ""):
                        found.append(here)
                else:
                    walk(v, here, in_options or k == STORAGE_OPTIONS)
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{where}[{i}]", in_options)

    walk(obj, "", False)
    return found


# ---- free text ------------------------------------------------------------------------------


def remember(options: Any, extra: Iterable[str] = (), *, is_options: bool = True) -> None:
    """Record the credential values in `options` (and in URIs in it), so that `scrub` masks them in
    any text this process prints later, whatever formats them. `is_options=False`: a whole config,
    whose `storage_options` mappings are searched."""
    names = credential_names(options, extra)

    def collect(o, in_options: bool):
        if isinstance(o, dict):
            for k, v in o.items():
                if in_options and _is_credential(k, names):
                    _add_values(v)
                else:
                    collect(v, in_options or k == STORAGE_OPTIONS)
        elif isinstance(o, (list, tuple)):
            for v in o:
                collect(v, in_options)
        elif isinstance(o, str):
            _add_values(list(split_uri_credentials(o)[1].values()))

    collect(options, is_options)


def _add_values(v: Any) -> None:
    global _known_longest_first
    if isinstance(v, str):
        if len(v) >= MIN_KNOWN_VALUE_LEN and v not in _known_values:
            _known_values.update({v, quote(v, safe=""), quote_plus(v)})
            _known_longest_first = tuple(sorted(_known_values, key=len, reverse=True))
    elif isinstance(v, dict):
        for x in v.values():
            _add_values(x)
    elif isinstance(v, (list, tuple)):
        for x in v:
            _add_values(x)


def _mask_known(text: str) -> str:
    for v in _known_longest_first:
        if v in text:
            text = text.replace(v, REDACTED)
    return text


def scrub(text: Any) -> str:
    """Free text with credentials in URIs, `name: value` / `name=value` pairs of credential names and
    every remembered secret value masked."""
    text = redact_uri(str(text))
    text = _NAME_VALUE.sub(lambda m: m.group("name") + REDACTED, text)
    return _mask_known(text)


def install_excepthook() -> None:
    """An uncaught exception's traceback is printed scrubbed (a job's last words go to logs that
    many people read). Idempotent."""
    if getattr(sys.excepthook, "_armolabel_scrubbed", False):
        return

    def hook(exc_type, exc, tb):
        sys.stderr.write(scrub("".join(traceback.format_exception(exc_type, exc, tb))))
        sys.stderr.flush()

    hook._armolabel_scrubbed = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def lift_uri_credentials(
    uris: Iterable[str], options: dict | None, where: str, inherited: bool = False
) -> tuple[list[str], dict | None]:
    """Move credentials embedded in URIs into (a copy of) the options that go with them, so that
    no path the job records or passes on carries a secret. All URIs must agree on the credentials
    (one options mapping serves them all), and with the options' own unless those are `inherited`
    (an input's URI credentials override the top-level ones); ValueError otherwise (the message
    names no value)."""
    clean: list[str] = []
    found: dict[str, str] = {}
    for uri in uris:
        c, creds = split_uri_credentials(uri)
        clean.append(c)
        for k, v in creds.items():
            if found.get(k, v) != v:
                raise ValueError(f"{where}: URIs carry different credentials; give them in storage_options")
            found[k] = v
    if not found:
        return clean, options
    opts = dict(options or {})
    for k, v in found.items():
        if not inherited and opts.get(k) not in (None, "", v):
            raise ValueError(f"{where}: a URI's credentials differ from storage_options.{k}")
        opts[k] = v
    remember(opts)
    return clean, opts


def lift_config_uris(data: dict, uri_keys: Iterable[str]) -> dict:
    """A config mapping with credentials in the URIs under `uri_keys` moved into its top-level
    storage_options (see lift_uri_credentials); the values found are remembered."""
    keys = [k for k in uri_keys if isinstance(data.get(k), str)]
    clean, so = lift_uri_credentials([data[k] for k in keys], data.get(STORAGE_OPTIONS), "/".join(keys))
    out = {**data, **dict(zip(keys, clean))}
    if so is not None:
        out[STORAGE_OPTIONS] = so
    remember(out, is_options=False)
    return out


def lift_input_uris(inputs: Any, top_options: dict | None) -> Any:
    """Input specs with credentials in their paths moved into their own storage_options (a copy of
    the top-level ones when the spec has none: the URI's credentials override those)."""
    if not isinstance(inputs, list):
        return inputs
    out = []
    for i, spec in enumerate(inputs):
        if isinstance(spec, dict) and isinstance(spec.get("path"), (str, list)):
            paths = [spec["path"]] if isinstance(spec["path"], str) else list(spec["path"])
            own = spec.get(STORAGE_OPTIONS) or top_options
            clean, so = lift_uri_credentials(paths, own, f"inputs[{i}]", inherited=not spec.get(STORAGE_OPTIONS))
            spec = {**spec, "path": clean[0] if isinstance(spec["path"], str) else clean}
            if so is not own:
                spec[STORAGE_OPTIONS] = so
        out.append(spec)
    remember(out, is_options=False)
    return out


def inline_credentials_warning(obj: Any) -> str | None:
    """The jobs' one-line warning when a config carries credentials, else None."""
    found = inline_credentials(obj)
    if not found:
        return None
    return (
        f"warning: the config carries credentials ({', '.join(found[:6])}{', ...' if len(found) > 6 else ''}): "
        "they are used but redacted in everything written or printed; the config file itself still holds "
        "them. Prefer the environment, a profile or a role (docs/operations.md#storage-credentials)"
    )
