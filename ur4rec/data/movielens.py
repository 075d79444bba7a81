"""MovieLens readers: GroupLens raw files, RecBole atomic files, and where to find them.

Sources for ML-100K, tried in this order (DESIGN section 2):

1. a folder the user names (``data.path``): GroupLens raw ``u.data``/``u.item`` or RecBole
   atomic ``ml-100k.inter``/``ml-100k.item``;
2. the copy bundled in the ``recbole`` wheel (``pip install --no-deps recbole==1.2.1``),
   read as data only; recbole itself is never imported;
3. the GroupLens URL, downloaded once into ``~/.cache/ur4rec`` (needs internet).

ML-1M reads ``ratings.dat``/``movies.dat`` (or atomic files) from a folder. Every reader
names the file and line of the first malformed record. ``u.item`` and ``movies.dat`` are
Latin-1; RecBole's atomic files are UTF-8 (read as Latin-1 when they are not valid UTF-8).
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GROUPLENS_URLS = {
    "ml-100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
    "ml-1m": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
}
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
]


class DataFormatError(ValueError):
    """A data file with a record that cannot be parsed; the message names file and line."""


class DatasetNotFoundError(FileNotFoundError):
    """No source could provide the dataset; the message lists every way to provide it."""


@dataclass
class ItemMeta:
    title: str
    year: int | None = None
    genres: list[str] = field(default_factory=list)


@dataclass
class RawInteractions:
    """Interactions as read from disk, with the raw (string) ids of the files."""

    name: str
    source: str
    users: np.ndarray  # (N,) str
    items: np.ndarray  # (N,) str
    timestamps: np.ndarray  # (N,) int64
    item_meta: dict[str, ItemMeta]


def load_movielens(name: str, path: str | Path | None = None) -> RawInteractions:
    """Read ML-100K or ML-1M from the first source that has it (see module docstring)."""
    if name not in GROUPLENS_URLS:
        raise ValueError(f"unknown MovieLens dataset {name!r}; expected ml-100k or ml-1m")
    if path is not None:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            where = "" if folder.is_absolute() else f" (a relative path is read from the current folder, {Path.cwd()})"
            raise DatasetNotFoundError(f"data.path {str(folder)!r} is not a folder{where}")
        return read_folder(name, folder)
    for folder in _candidate_folders(name):
        if folder.is_dir() and _has_dataset_files(folder):
            return read_folder(name, folder)
    return read_folder(name, download(name))


def _candidate_folders(name: str) -> list[Path]:
    folders = [cache_dir() / name]
    if name == "ml-100k":
        spec = importlib.util.find_spec("recbole")
        if spec is not None and spec.submodule_search_locations:
            wheel = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / name
            folders.insert(0, wheel)
    return folders


def cache_dir() -> Path:
    return Path(os.environ.get("UR4REC_CACHE", Path.home() / ".cache" / "ur4rec"))


def _has_dataset_files(folder: Path) -> bool:
    names = {"u.data", "ratings.dat"}
    return any((folder / n).exists() for n in names) or any(folder.glob("*.inter"))


def download(name: str) -> Path:
    """Fetch the GroupLens zip into the cache; offline, fail at once naming the other ways."""
    url = GROUPLENS_URLS[name]
    target = cache_dir() / name
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            payload = response.read()
    except OSError as error:
        raw_files = "u.data and u.item" if name == "ml-100k" else "ratings.dat and movies.dat"
        ways = [
            f"  1. download {url} yourself, unzip it, and set data.path to the folder "
            f"holding {raw_files} (RecBole atomic .inter/.item files work too);",
        ]
        if name == "ml-100k":
            ways.append(
                "  2. install the copy bundled in RecBole's wheel, used as data only:\n"
                "     pip install --no-deps recbole==1.2.1"
            )
        ways.append(f"  {len(ways) + 1}. connect to the internet so UR4Rec can fetch {url}")
        raise DatasetNotFoundError(
            f"{name} was not found locally and could not be downloaded ({error}).\n"
            "Provide it in one of these ways:\n" + "\n".join(ways)
        ) from error
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        members = [member for member in archive.namelist() if not member.endswith("/")]
        # the ratings file last, each file written whole: until the ratings file is there the folder
        # does not count as holding the dataset, so a stopped extraction is done again rather than
        # read later without its item file (every title "item N")
        members.sort(key=lambda member: Path(member).name == RAW_RATINGS[name])
        for member in members:
            path = target / Path(member).name
            partial = path.with_name(f".{path.name}.partial")
            partial.write_bytes(archive.read(member))
            os.replace(partial, path)
    return target


RAW_RATINGS = {"ml-100k": "u.data", "ml-1m": "ratings.dat"}


def read_folder(name: str, folder: Path) -> RawInteractions:
    if (folder / RAW_RATINGS[name]).exists():
        return (_read_raw_100k if name == "ml-100k" else _read_raw_1m)(name, folder)
    for other, ratings in RAW_RATINGS.items():
        if (folder / ratings).exists():  # another dataset's raw files: reading them as `name` would mislabel the run
            raise DataFormatError(f"{folder} holds {ratings}, the {other} raw ratings, but data.name is {name!r}; "
                                  f"set data.name: {other}")
    inter = sorted(folder.glob("*.inter"))
    for other in RAW_RATINGS:  # the same for another dataset's atomic file, when it is the only one
        if other != name and inter == [folder / f"{other}.inter"]:
            raise DataFormatError(f"{folder} holds {other}.inter, the {other} interactions, but data.name is "
                                  f"{name!r}; set data.name: {other}")
    if len(inter) > 1 and (folder / f"{name}.inter") in inter:
        inter = [folder / f"{name}.inter"]
    if len(inter) > 1:
        raise DataFormatError(f"{folder} holds {len(inter)} RecBole .inter files ({', '.join(p.name for p in inter)}) "
                              f"and none is {name}.inter; keep one, or name the one to read {name}.inter")
    if inter:
        return _read_atomic(name, inter[0])
    raise DatasetNotFoundError(
        f"{folder} holds no MovieLens files: expected u.data/u.item (ML-100K), "
        "ratings.dat/movies.dat (ML-1M) or RecBole atomic .inter/.item files"
    )


_BOM = "\ufeff".encode().decode("latin-1")  # a UTF-8 byte-order mark as the Latin-1 reader sees it


def _numbered_lines(handle, start: int = 1):
    """(line number, line) of an open file, without a byte-order mark on line 1 (editors on
    Windows add one; it would otherwise become part of the first user's or item's id)."""
    for line_number, line in enumerate(handle, start=start):
        yield line_number, line.removeprefix(_BOM) if line_number == 1 else line


def _atomic_encoding(path: Path) -> str:
    """RecBole's atomic files are UTF-8 (its ml-100k.item writes "Misérables" in UTF-8): read
    them so, or as Latin-1 when they are not valid UTF-8 (as GroupLens's own files are)."""
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return "latin-1"
    return "utf-8-sig"


def _parse_interactions(path: Path, separator: str | None, skip_header: bool, encoding: str = "latin-1",
                        fields: int = 4) -> tuple:
    """Every record has exactly ``fields`` fields, the first four user, item, rating, timestamp: a
    record with more is an error too (two records on one line, a lost newline, would otherwise
    read as one, its timestamp the two run together)."""
    users, items, stamps = [], [], []
    with open(path, encoding=encoding) as handle:
        for line_number, line in _numbered_lines(handle):
            if skip_header and line_number == 1:
                continue
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split(separator)
            try:
                if len(parts) != fields:
                    raise ValueError(f"expected {fields} fields (user, item, rating, timestamp"
                                     f"{', ...' if fields > 4 else ''}), got {len(parts)}")
                user, item, timestamp = parts[0].strip(), parts[1].strip(), _whole_seconds(parts[3])
                try:
                    float(parts[2])
                except ValueError:
                    raise ValueError(f"rating {parts[2].strip()!r} is not a number") from None
                if not user or not item:
                    raise ValueError("empty user or item id")
            except ValueError as error:
                raise DataFormatError(f"{path}, line {line_number}: {error}: {line.strip()!r}") from None
            users.append(user)
            items.append(item)
            stamps.append(timestamp)
    if not users:
        raise DataFormatError(f"{path}: no interactions found")
    return np.array(users), np.array(items), np.array(stamps, dtype=np.int64)


def _whole_seconds(text: str) -> int:
    """A timestamp as an int64 number of seconds. ``978300760`` and ``978300760.0`` are read;
    a fraction of a second is refused rather than truncated, since truncation would silently
    turn ordered interactions into ties (and ``train.tie_gap`` counts whole seconds)."""
    text = text.strip()
    try:
        value = int(text)  # exact beyond 2**53, where a float would round
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"timestamp {text!r} is not a number") from None
        if not -2**63 <= number < 2**63:  # also inf and nan
            raise ValueError(f"timestamp {text!r} is not a 64-bit integer") from None
        if not number.is_integer():
            raise ValueError(f"timestamp {text!r} is not a whole number of seconds; UR4Rec orders "
                             "interactions by whole seconds, so round or rescale the column") from None
        value = int(number)
    if not -2**63 <= value < 2**63:
        raise ValueError(f"timestamp {text!r} is not a 64-bit integer")
    return value


def _add_item(meta: dict[str, ItemMeta], lines: dict[str, int], item_id: str, item: ItemMeta,
              path: Path, line_number: int) -> None:
    """Add one item's metadata; an id given twice is an error naming both lines (the last one
    used to win silently)."""
    if item_id in lines:
        raise DataFormatError(f"{path}, line {line_number}: item id {item_id!r} was already given on "
                              f"line {lines[item_id]}")
    meta[item_id], lines[item_id] = item, line_number


_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _title_and_year(title: str, date: str = "") -> tuple[str, int | None]:
    match = _YEAR.search(title)
    if match:
        return title[: match.start()].strip(), int(match.group(1))
    date_year = re.search(r"(\d{4})", date)
    return title.strip(), int(date_year.group(1)) if date_year else None


def _read_raw_100k(name: str, folder: Path) -> RawInteractions:
    users, items, stamps = _parse_interactions(folder / "u.data", "\t", skip_header=False)
    meta: dict[str, ItemMeta] = {}
    lines: dict[str, int] = {}
    item_file = folder / "u.item"
    if item_file.exists():
        with open(item_file, encoding="latin-1") as handle:
            for line_number, line in _numbered_lines(handle):
                if not line.strip():
                    continue
                parts = line.rstrip("\r\n").split("|")
                if len(parts) != 5 + len(ML100K_GENRES):  # more would shift the genre flags
                    raise DataFormatError(
                        f"{item_file}, line {line_number}: expected {5 + len(ML100K_GENRES)} "
                        f"'|'-separated fields (id, title, date, video date, URL, 19 genre flags), got {len(parts)}"
                    )
                title, year = _title_and_year(parts[1], parts[2])
                flags = parts[5 : 5 + len(ML100K_GENRES)]
                genres = [g for g, flag in zip(ML100K_GENRES, flags) if flag.strip() == "1"]
                _add_item(meta, lines, parts[0].strip(), ItemMeta(title, year, genres), item_file, line_number)
    return RawInteractions(name, f"GroupLens raw files in {folder}", users, items, stamps, meta)


def _read_raw_1m(name: str, folder: Path) -> RawInteractions:
    users, items, stamps = _parse_interactions(folder / "ratings.dat", "::", skip_header=False)
    meta: dict[str, ItemMeta] = {}
    lines: dict[str, int] = {}
    movie_file = folder / "movies.dat"
    if movie_file.exists():
        with open(movie_file, encoding="latin-1") as handle:
            for line_number, line in _numbered_lines(handle):
                if not line.strip():
                    continue
                parts = line.rstrip("\r\n").split("::")
                if len(parts) != 3:
                    raise DataFormatError(
                        f"{movie_file}, line {line_number}: expected 'id::title::genres', got {line.strip()!r}"
                    )
                title, year = _title_and_year(parts[1])
                _add_item(meta, lines, parts[0].strip(), ItemMeta(title, year, [g for g in parts[2].split("|") if g]),
                          movie_file, line_number)
    return RawInteractions(name, f"GroupLens raw files in {folder}", users, items, stamps, meta)


def _read_atomic(name: str, inter_file: Path) -> RawInteractions:
    encoding = _atomic_encoding(inter_file)
    with open(inter_file, encoding=encoding) as handle:
        header = handle.readline().removeprefix(_BOM).rstrip("\r\n").split("\t")
    columns = [h.split(":")[0] for h in header]
    expected = ["user_id", "item_id", "rating", "timestamp"]
    if columns[:4] != expected:
        raise DataFormatError(f"{inter_file}, line 1: expected columns {expected}, got {columns}")
    users, items, stamps = _parse_interactions(inter_file, "\t", skip_header=True, encoding=encoding,
                                               fields=len(header))
    meta: dict[str, ItemMeta] = {}
    lines: dict[str, int] = {}
    item_file = inter_file.with_suffix(".item")
    if item_file.exists():
        with open(item_file, encoding=_atomic_encoding(item_file)) as handle:
            head = [h.split(":")[0] for h in handle.readline().removeprefix(_BOM).rstrip("\r\n").split("\t")]
            if "item_id" not in head:
                raise DataFormatError(f"{item_file}, line 1: no item_id column in the header {head}")
            for line_number, line in _numbered_lines(handle, start=2):
                if not line.strip():  # blank lines are skipped, as in the other readers
                    continue
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) != len(head):
                    raise DataFormatError(
                        f"{item_file}, line {line_number}: expected {len(head)} fields, got {len(parts)}"
                    )
                row = dict(zip(head, parts))
                title, year = _title_and_year(row.get("movie_title", row.get("title", "")))
                if row.get("release_year", "").strip().isdigit():
                    year = int(row["release_year"])
                genres = row.get("class", row.get("genre", "")).split()
                _add_item(meta, lines, row["item_id"].strip(), ItemMeta(title, year, genres), item_file, line_number)
    return RawInteractions(name, f"RecBole atomic files in {inter_file.parent}", users, items, stamps, meta)
