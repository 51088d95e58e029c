#!/usr/bin/env bash
# Issue 22, fifth session: the CPU proxy of a GPU node, old (a worktree of 4885fdb) against new
# (read buffers allocated without the GIL, none twice), interleaved new, old, old, new: the
# fourth session's script (the same command, both sides running this checkout's benchmark,
# PYTHONPATH picking the side's code) in that order.
ORDER=${ORDER:-"new old old new"} exec bash "$(dirname "$0")/../session4/run.sh"
