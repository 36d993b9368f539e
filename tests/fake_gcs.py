"""An offline Google Cloud Storage for tests: gs:// paths work end to end inside one process.

One in-memory object store, seen three ways, as the real libraries see GCS:
  - an fsspec filesystem registered for 'gs' and 'gcs', which etils.epath uses for gs:// paths
    (where gcsfs would serve them on a real machine): config, metrics, TensorBoard, plots, orbax's
    metadata files;
  - an HTTP server speaking the part of the GCS JSON API that tensorstore (orbax's arrays, through
    TENSORSTORE_GCS_HTTP_URL) and google-cloud-cpp (array_record's reader, through
    CLOUD_STORAGE_EMULATOR_ENDPOINT) use.
Like GCS it has no directories: a "directory" exists while some object's name starts with it, and
objects cannot be appended to.
"""
import contextlib
import http.server
import io
import itertools
import json
import os
import sys
import threading
import types
import urllib.parse

import fsspec
from fsspec.spec import AbstractFileSystem

_LOCK = threading.Lock()
_OBJECTS: dict[str, tuple[bytes, int]] = {}  # 'bucket/name' -> (data, generation)
_GENERATIONS = itertools.count(1)


def objects() -> dict[str, bytes]:
  """A snapshot of the store: 'bucket/name' -> contents."""
  with _LOCK:
    return {name: data for name, (data, _) in _OBJECTS.items()}


def _put(name, data, if_generation_match=None) -> int | None:
  with _LOCK:
    current = _OBJECTS.get(name, (None, 0))[1]
    if if_generation_match is not None and int(if_generation_match) != current:
      return None
    generation = next(_GENERATIONS)
    _OBJECTS[name] = (bytes(data), generation)
    return generation


def _get(name):
  with _LOCK:
    return _OBJECTS.get(name)


def _delete(name, if_generation_match=None) -> bool | None:
  with _LOCK:
    if name not in _OBJECTS:
      return False
    if if_generation_match is not None and int(if_generation_match) != _OBJECTS[name][1]:
      return None
    del _OBJECTS[name]
    return True


def _names_with_prefix(prefix):
  with _LOCK:
    return sorted(name for name in _OBJECTS if name.startswith(prefix))


class _WriteOnClose(io.BytesIO):
  """GCS writes an object whole when the upload ends, never part of it."""

  def __init__(self, name):
    super().__init__()
    self.name = name

  def close(self):
    if not self.closed:
      _put(self.name, self.getvalue())
    super().close()


class FakeGcsFileSystem(AbstractFileSystem):
  """fsspec over the shared store, with gcsfs's path conventions ('bucket/name', no protocol)."""

  protocol = ('gs', 'gcs')
  root_marker = ''

  def __init__(self, *args, **kwargs):  # gcsfs takes options such as finalize_on_close.
    super().__init__()

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ('gs://', 'gcs://'):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return path.rstrip('/')

  def _file_info(self, name):
    stored = _get(name)
    if stored is None:
      return None
    return {'name': name, 'size': len(stored[0]), 'type': 'file', 'generation': stored[1]}

  def info(self, path, **kwargs):
    name = self._strip_protocol(path)
    info = self._file_info(name)
    if info is not None:
      return info
    if not name or '/' not in name or _names_with_prefix(name + '/'):
      return {'name': name, 'size': 0, 'type': 'directory'}  # A bucket, or a prefix of objects.
    raise FileNotFoundError(path)

  def ls(self, path, detail=True, **kwargs):
    name = self._strip_protocol(path)
    if self._file_info(name) is not None:
      entries = [self._file_info(name)]
    else:
      prefix = name + '/' if name else ''
      children = {}
      for full in _names_with_prefix(prefix):
        child, sep, _ = full[len(prefix):].partition('/')
        if sep:
          children.setdefault(prefix + child, {'name': prefix + child, 'size': 0, 'type': 'directory'})
        else:
          children[full] = self._file_info(full)
      if not children and '/' in name:
        raise FileNotFoundError(path)
      entries = [children[key] for key in sorted(children)]
    return entries if detail else [entry['name'] for entry in entries]

  def _open(self, path, mode='rb', **kwargs):
    name = self._strip_protocol(path)
    if mode == 'rb':
      stored = _get(name)
      if stored is None:
        raise FileNotFoundError(path)
      return io.BytesIO(stored[0])
    if mode == 'wb':
      return _WriteOnClose(name)
    raise NotImplementedError(f'mode {mode!r}: GCS objects cannot be appended to or updated in place')

  def mkdir(self, path, create_parents=True, **kwargs):
    pass  # No directories in GCS.

  def makedirs(self, path, exist_ok=False):
    pass

  def rmdir(self, path):
    pass

  def rm_file(self, path):
    if not _delete(self._strip_protocol(path)):
      raise FileNotFoundError(path)

  def _rm(self, path):
    self.rm_file(path)

  def rm(self, path, recursive=False, maxdepth=None):
    for p in (path if isinstance(path, list) else [path]):
      name = self._strip_protocol(p)
      if recursive:
        for full in _names_with_prefix(name + '/'):
          _delete(full)
      if self._file_info(name) is not None:
        _delete(name)

  def cp_file(self, path1, path2, **kwargs):
    stored = _get(self._strip_protocol(path1))
    if stored is None:
      raise FileNotFoundError(path1)
    _put(self._strip_protocol(path2), stored[0])

  def modified(self, path):
    raise NotImplementedError


class _JsonApi(http.server.BaseHTTPRequestHandler):
  """GCS JSON API: media upload, media and metadata download, list, delete."""

  protocol_version = 'HTTP/1.1'

  def log_message(self, *args):
    pass

  def _reply(self, code, body=b'', headers=()):
    if isinstance(body, dict):
      body = json.dumps(body).encode()
    self.send_response(code)
    for key, value in headers:
      self.send_header(key, value)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(body)

  def _parse(self):
    url = urllib.parse.urlsplit(self.path)
    query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
    parts = [urllib.parse.unquote(p) for p in url.path.split('/')]
    return parts, query

  @staticmethod
  def _metadata(bucket, key, data, generation):
    return {'kind': 'storage#object', 'bucket': bucket, 'name': key, 'size': str(len(data)),
            'generation': str(generation), 'metageneration': '1', 'contentType': 'application/octet-stream',
            'id': f'{bucket}/{key}/{generation}', 'timeCreated': '2026-01-01T00:00:00.000Z',
            'updated': '2026-01-01T00:00:00.000Z'}

  def do_POST(self):
    parts, query = self._parse()
    body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
    # /upload/storage/v1/b/BUCKET/o?uploadType=media&name=KEY
    if parts[1:6] != ['upload', 'storage', 'v1', 'b', parts[5]] or query.get('uploadType') != 'media':
      return self._reply(501, {'error': f'unsupported upload {self.path}'})
    bucket, key = parts[5], query['name']
    generation = _put(f'{bucket}/{key}', body, query.get('ifGenerationMatch'))
    if generation is None:
      return self._reply(412, {'error': 'precondition failed'})
    self._reply(200, self._metadata(bucket, key, body, generation))

  def do_GET(self):
    parts, query = self._parse()
    if parts[1:4] != ['storage', 'v1', 'b'] or len(parts) < 6 or parts[5] != 'o':
      return self._reply(501, {'error': f'unsupported {self.path}'})
    bucket = parts[4]
    if len(parts) == 6 or parts[6] == '':
      return self._list(bucket, query)
    key = '/'.join(parts[6:])
    stored = _get(f'{bucket}/{key}')
    if stored is None:
      return self._reply(404, {'error': 'not found'})
    data, generation = stored
    if 'ifGenerationMatch' in query and int(query['ifGenerationMatch']) != generation:
      return self._reply(412, {'error': 'precondition failed'})
    if 'ifGenerationNotMatch' in query and int(query['ifGenerationNotMatch']) == generation:
      return self._reply(304, headers=[('x-goog-generation', str(generation))])
    if query.get('alt') != 'media':
      return self._reply(200, self._metadata(bucket, key, data, generation))
    headers = [('x-goog-generation', str(generation)), ('Content-Type', 'application/octet-stream')]
    byte_range = self.headers.get('Range')
    if byte_range:
      first, _, last = byte_range.removeprefix('bytes=').partition('-')
      if first == '':  # A suffix: the last N bytes.
        first, last = max(len(data) - int(last), 0), len(data) - 1
      first, last = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
      if first >= len(data) and len(data) > 0:
        return self._reply(416, headers=[('Content-Range', f'bytes */{len(data)}')])
      headers.append(('Content-Range', f'bytes {first}-{last}/{len(data)}'))
      return self._reply(206, data[first:last + 1], headers)
    self._reply(200, data, headers)

  do_HEAD = do_GET

  def _list(self, bucket, query):
    prefix = query.get('prefix', '')
    start, end = query.get('startOffset', ''), query.get('endOffset')
    items, prefixes = [], set()
    delimiter = query.get('delimiter')
    for full in _names_with_prefix(f'{bucket}/{prefix}'):
      key = full[len(bucket) + 1:]
      if key < start or (end and key >= end):
        continue
      if delimiter and delimiter in key[len(prefix):]:
        prefixes.add(key[:len(prefix) + key[len(prefix):].index(delimiter) + 1])
        continue
      data, generation = _get(full) or (b'', 0)
      items.append(self._metadata(bucket, key, data, generation))
    listing = {'kind': 'storage#objects', 'items': items}
    if prefixes:
      listing['prefixes'] = sorted(prefixes)
    self._reply(200, listing)

  def do_DELETE(self):
    parts, query = self._parse()
    if parts[1:4] != ['storage', 'v1', 'b'] or len(parts) < 7 or parts[5] != 'o':
      return self._reply(501, {'error': f'unsupported {self.path}'})
    deleted = _delete(f'{parts[4]}/{"/".join(parts[6:])}', query.get('ifGenerationMatch'))
    if deleted is None:
      return self._reply(412, {'error': 'precondition failed'})
    self._reply(204 if deleted else 404)


class _Bucket:
  hierarchical_namespace_enabled = False


class _StorageClient:
  """What orbax asks google-cloud-storage (a dependency of gcsfs) before listing or deleting steps."""

  def get_bucket(self, name):
    return _Bucket()


def _install_storage_client():
  import google.cloud
  storage = types.ModuleType('google.cloud.storage')
  storage.Client = _StorageClient
  sys.modules['google.cloud.storage'] = google.cloud.storage = storage


@contextlib.contextmanager
def serve():
  """Starts the HTTP view, points tensorstore and google-cloud-cpp at it, registers the fsspec view."""
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _JsonApi)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  url = f'http://127.0.0.1:{server.server_address[1]}'
  env = {'TENSORSTORE_GCS_HTTP_URL': url, 'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,
         'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'offline', 'NO_PROXY': '127.0.0.1', 'no_proxy': '127.0.0.1'}
  saved = {key: os.environ.get(key) for key in env}
  os.environ.update(env)
  _install_storage_client()
  for protocol in FakeGcsFileSystem.protocol:
    fsspec.register_implementation(protocol, FakeGcsFileSystem, clobber=True)
  try:
    yield url
  finally:
    server.shutdown()
    server.server_close()
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
