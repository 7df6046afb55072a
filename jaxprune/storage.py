"""Google Cloud Storage (gs://) as a run's storage: what it needs, the check made before a
run writes there, and the conditional writes that claims are made of.

Everything on gs:// (installed by the `gcs` extra) reads Google's Application Default
Credentials: small files and the compilation cache go through `etils.epath` over gcsfs,
orbax checkpoints through tensorstore's gcs driver, claims (`pipeline.workdir`) through
google-cloud-storage here. Every change of a claim object is conditional on its generation
(`create`, `replace`, `delete`), so of several processes writing at once exactly one succeeds.

`check` runs for every gs:// URL a run uses, before anything is written (the extra
installed, credentials found, the bucket reachable, existing and listable), each request
timing out after CHECK_REQUEST_S and retried for at most CHECK_DEADLINE_S: an offline
machine, a wrong bucket, missing credentials or a permission error is one ConfigError
within seconds. Permission to write shows at the first write, the work directory's claim,
as the same kind of ConfigError. Later requests retry as their clients do (docs/gcs.md).
"""

import dataclasses
import functools
import logging
import os
import re

from jaxprune.errors import ConfigError

EMULATOR_ENV_VAR = 'STORAGE_EMULATOR_HOST'
CHECK_REQUEST_S = 2.0
CHECK_DEADLINE_S = 4.0
# How requests quotes the OS's reason inside its ConnectionError.
_OS_REASON = re.compile(r'\[Errno -?\d+\] ([^)\'"]+)')
INSTALL = "pip install 'jaxprune[gcs]' (in a clone: pip install -e '.[gcs]')"


@dataclasses.dataclass(frozen=True)
class Object:
  """An object's text and its generation (changed by every write)."""
  text: str
  generation: int


def split(url: str) -> tuple[str, str]:
  """('BUCKET', 'PATH') of 'gs://BUCKET/PATH'."""
  bucket, _, name = str(url).removeprefix('gs://').partition('/')
  return bucket, name


def configure() -> None:
  """Sets what epath, gcsfs and tensorstore need before they open anything, keeping settings
  the user made."""
  import fsspec
  # 'false' keeps etils.epath on gcsfs (one client, the one tested) where TensorFlow is installed.
  os.environ.setdefault('EPATH_USE_TF', 'false')
  # gcsfs reads it when it is imported: 'true' (its default) makes every gs:// file system
  # ask the storage control API for the bucket's layout.
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  if os.environ.get(EMULATOR_ENV_VAR):
    os.environ.setdefault('TENSORSTORE_GCS_HTTP_URL', os.environ[EMULATOR_ENV_VAR])
  # Another process's new files (a shared baseline's results.json) must be seen.
  fsspec.config.conf.setdefault('gs', {}).setdefault('use_listings_cache', False)
  # fsspec logs every gs:// file it opens for reading, at INFO.
  reads = logging.getLogger('fsspec.caching')
  reads.setLevel(max(reads.level, logging.WARNING))


def _client():
  """The google-cloud-storage client of the endpoint STORAGE_EMULATOR_HOST names now."""
  return _client_of(os.environ.get(EMULATOR_ENV_VAR))


@functools.cache
def _client_of(emulator: str | None):
  del emulator  # The client reads it; the argument keys the cache.
  from google.cloud import storage
  return storage.Client()


def _refusal(error: Exception, url: str, setting: str | None) -> ConfigError | None:
  """The ConfigError that says what `error` (from a request about `url`, the value of
  `setting` if given) means for the user, or None if it is none of storage's refusals."""
  from google.api_core import exceptions as api
  from google.auth import exceptions as auth
  import requests
  bucket, _ = split(url)
  emulator = os.environ.get(EMULATOR_ENV_VAR)
  where = (f'the GCS emulator at {emulator} ({EMULATOR_ENV_VAR})' if emulator else
           'Google Cloud Storage')
  head = f'{setting} {url!r}' if setting else repr(url)
  settings = (setting,) if setting else ()
  if isinstance(error, auth.DefaultCredentialsError):
    return ConfigError(f'{head} needs Google Cloud credentials and none were found; run '
                       '`gcloud auth application-default login`, set '
                       'GOOGLE_APPLICATION_CREDENTIALS to a key file, or run on a Google '
                       'Cloud VM with a service account.', settings=settings)
  if isinstance(error, api.NotFound):
    return ConfigError(f'{head}: the bucket gs://{bucket} does not exist on {where}; '
                       f'create it (gcloud storage buckets create gs://{bucket}) or give '
                       'another.', settings=settings)
  if isinstance(error, (api.Forbidden, api.Unauthorized, auth.RefreshError)):
    return ConfigError(f'{head}: these credentials may not read and write objects in '
                       f'gs://{bucket} ({_first_line(error)}); grant their account '
                       'roles/storage.objectUser on the bucket, or give a bucket it may use.',
                       settings=settings)
  if isinstance(error, api.BadRequest):
    return ConfigError(f'{head} is refused by {where} ({_first_line(error)}); give '
                       'gs://BUCKET/PATH with an existing bucket.', settings=settings)
  if isinstance(error, (api.RetryError, api.ServerError, auth.TransportError,
                        requests.exceptions.RequestException)):
    return ConfigError(f'{head}: {where} cannot be reached ({_unreachable(error)}); '
                       'check the network (or start the emulator), or give a local '
                       'directory.', settings=settings)
  return None


def _unreachable(error: Exception) -> str:
  """Why a connection failed, in a few words ('Connection refused')."""
  cause = getattr(error, 'cause', None) or error
  reason = _OS_REASON.search(str(cause))
  return reason.group(1).strip() if reason else type(cause).__name__


def _first_line(error: Exception) -> str:
  cause = getattr(error, 'cause', None) or error
  text = str(cause).strip().splitlines()
  return f'{type(cause).__name__}: {text[0][:200] if text else ""}'.rstrip(': ')


def check(url: str, setting: str) -> None:
  """Raises ConfigError unless gs://BUCKET/PATH `url` can hold `setting`'s files (the module
  docstring says what is checked, and for how long); writes nothing."""
  if not url.startswith('gs://'):
    raise ConfigError(f'{setting} {url!r} is not a path jaxprune can store a run in; give a '
                      'local directory or gs://BUCKET/PATH.', settings=(setting,))
  bucket, prefix = split(url)
  if not bucket:
    raise ConfigError(f'{setting} {url!r} names no bucket; give gs://BUCKET/PATH.',
                      settings=(setting,))
  configure()
  try:
    import gcsfs  # pylint: disable=unused-import
    from google.cloud import storage  # pylint: disable=unused-import
  except ImportError:
    raise ConfigError(f'{setting} {url!r} is on Google Cloud Storage, which needs the gcs '
                      f'extra: {INSTALL}.', settings=(setting,)) from None
  from google.api_core.retry import Retry
  retry = Retry(initial=0.25, maximum=1.0, multiplier=2.0, timeout=CHECK_DEADLINE_S)
  _api_call(url, lambda: list(_client().list_blobs(
      bucket, prefix=prefix, max_results=1, timeout=CHECK_REQUEST_S, retry=retry)), setting)


def _api_call(url: str, call, setting: str | None = None):
  """call()'s result, with storage's refusals (`_refusal`) as one ConfigError. Without a
  `setting` (past `check`) an absent object or a failed precondition is the caller's."""
  try:
    return call()
  except Exception as error:  # pylint: disable=broad-except
    from google.api_core import exceptions as api
    if setting is None and isinstance(error, (api.PreconditionFailed, api.NotFound)):
      raise
    refusal = _refusal(error, url, setting)
    if refusal is None:
      raise
    raise refusal from None


def _blob(url: str, generation: int | None = None):
  bucket, name = split(url)
  return _client().bucket(bucket).blob(name, generation=generation)


def read(url: str) -> Object | None:
  """The object at `url`, or None if there is none."""
  from google.api_core import exceptions as api
  blob = _blob(url)
  try:
    text = _api_call(url, blob.download_as_bytes).decode('utf-8', errors='replace')
  except api.NotFound:
    return None
  return Object(text, int(blob.generation))


def updated(url: str, generation: int) -> float | None:
  """When generation `generation` of the object at `url` was written (POSIX seconds), or
  None if the object is no longer that generation."""
  from google.api_core import exceptions as api
  blob = _blob(url, generation)
  try:
    _api_call(url, blob.reload)
  except api.NotFound:
    return None
  return blob.updated.timestamp()


def create(url: str, text: str) -> int | None:
  """Creates the object at `url` with `text` if there is none (`replace` of generation 0)."""
  return replace(url, text, 0)


def replace(url: str, text: str, generation: int) -> int | None:
  """Replaces the object at `url` with `text` if it is still generation `generation` (0:
  absent); the new generation, or None if it was changed or deleted since. A write whose
  answer was lost and that was sent again finds its own text there: it succeeded."""
  from google.api_core import exceptions as api
  blob = _blob(url)
  try:
    _api_call(url, lambda: blob.upload_from_string(text, content_type='application/json',
                                                    if_generation_match=generation))
  except api.PreconditionFailed:
    current = read(url)
    return current.generation if current is not None and current.text == text else None
  return int(blob.generation)


def move(source: str, target: str) -> None:
  """Moves every object under the "directory" `source` to the same name under `target`, in
  the same bucket (GCS has no directories to rename, and etils.epath renames none)."""
  bucket_name, source_prefix = split(source.rstrip('/') + '/')
  _, target_prefix = split(target.rstrip('/') + '/')
  bucket = _client().bucket(bucket_name)
  for blob in _client().list_blobs(bucket_name, prefix=source_prefix):
    _api_call(source, lambda blob=blob: bucket.rename_blob(
        blob, target_prefix + blob.name[len(source_prefix):]))


def delete(url: str, generation: int) -> bool:
  """Deletes the object at `url` if it is still generation `generation`; whether it did."""
  from google.api_core import exceptions as api
  try:
    _api_call(url, lambda: _blob(url).delete(if_generation_match=generation))
  except (api.PreconditionFailed, api.NotFound):
    return False
  return True
