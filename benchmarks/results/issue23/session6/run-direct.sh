#!/usr/bin/env bash
# Issue 23, sixth session, after the node's copy is written around the page cache (O_DIRECT):
# the default path with the copy made inside the run (cold), then with a copy a run before
# left (warm). OUT: where the logs and JSONs go.
OUT=${OUT:-/tmp/s23d} SPECS="auto cold|auto,inline warm" TAG=s3-direct \
    exec bash "$(dirname "$0")/run-final.sh"
