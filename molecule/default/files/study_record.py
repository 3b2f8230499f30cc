"""Print the MongoDB study record of one Study Instance UID as JSON; exit 1 while there is none.

Molecule's verify step runs it on the central host with the dicomfleet venv's Python, which has pymongo.
"""

import argparse
import json
import sys

import pymongo


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uri", required=True, help="MongoDB URI of the site's study database")
    parser.add_argument("--database", default="dicomfleet", help="database name (default dicomfleet)")
    parser.add_argument("--study", required=True, help="Study Instance UID to look up")
    return parser


def main(args=None) -> int:
    options = _build_parser().parse_args(args)
    client = pymongo.MongoClient(options.uri, serverSelectionTimeoutMS=5000)
    try:
        record = client[options.database].studies.find_one({"studyInstanceUID": options.study}, {"_id": 0})
    finally:
        client.close()

    if record is None:
        print(f"No study record for {options.study} in {options.database}.studies yet.", file=sys.stderr)
        return 1
    print(json.dumps(record, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
