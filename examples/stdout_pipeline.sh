#!/usr/bin/env bash
# Embeddings as JSON lines on stdout, for shell pipelines: here the clip-embedding norm per file.
#   bash examples/stdout_pipeline.sh RUN AUDIO_FOLDER
set -euo pipefail
sslaudio extract "$1" "$2" --out - 2>/dev/null |
  python -c "import json,sys,math
for line in sys.stdin:
    r = json.loads(line); print(r['path'], round(math.sqrt(sum(v*v for v in r['clip'])), 3))"
