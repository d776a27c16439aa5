"""A stand-in object store for the tests of `gs://` paths (which need cloud credentials): Beam's filesystems and
yagg's path layer (contracts/storage.py) reach it through its `objstore://` scheme once this module is imported."""

import os

from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem


class ObjectStore(LocalFileSystem):
    """A stand-in for gs:// (which needs cloud credentials): `objstore://x/y` is the local `/x/y`, and folders do not
    exist as such, as on an object store. Beam finds the class by its scheme once this module is imported."""

    PREFIX = "objstore:/"

    @classmethod
    def scheme(cls):
        return "objstore"

    def _local(self, path):
        return path.removeprefix(self.PREFIX)

    def join(self, base, *paths):
        return "/".join([base.rstrip("/"), *paths])

    def split(self, path):
        head, _, tail = path.rstrip("/").rpartition("/")
        return head, tail

    def has_dirs(self):
        return False

    def exists(self, path):
        if path.startswith(self.PREFIX):  # only objects exist; LocalFileSystem's own calls pass local paths
            return os.path.isfile(self._local(path))
        return super().exists(path)

    def _list(self, prefix):
        for m in super()._list(self._local(prefix)):
            yield FileMetadata(self.PREFIX + m.path, m.size_in_bytes, m.last_updated_in_seconds)

    def metadata(self, path):
        m = super().metadata(self._local(path))
        return FileMetadata(path, m.size_in_bytes, m.last_updated_in_seconds)

    def create(self, path, *args, **kwargs):
        return super().create(self._local(path), *args, **kwargs)

    def open(self, path, *args, **kwargs):
        return super().open(self._local(path), *args, **kwargs)

    def rename(self, sources, destinations):
        super().rename([self._local(p) for p in sources], [self._local(p) for p in destinations])

    def delete(self, paths):
        super().delete([self._local(p) for p in paths])
