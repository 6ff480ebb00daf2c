set -euo pipefail
export PATH=$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin:$PATH  # the console scripts setup.py installs
# docs/your_corpus.md, every step timed, on the man pages render_man3.py writes (run it in
# DIR first).  Usage: bash experiments/user_journey/journey.sh [DIR]
D=${1:-/tmp/journey}
CORPUS=$D/corpus/train
HELDOUT=$D/corpus/heldout
WORK=$D/work
mkdir -p $WORK
echo "=== $(date +%T) retro-train-tokenizer --corpus=$CORPUS --output=$WORK/tokenizer/spm --vocab_size=4096      --model_type=bpe"; /usr/bin/time -f "wall %e s, peak RSS %M kB" retro-train-tokenizer --corpus=$CORPUS --output=$WORK/tokenizer/spm --vocab_size=4096      --model_type=bpe
echo "=== $(date +%T) retro-build-db --corpus=$CORPUS --tokenizer=$WORK/tokenizer/spm.model --output=$WORK/db      --chunk_size=32 --bert=hashing:4096"; /usr/bin/time -f "wall %e s, peak RSS %M kB" retro-build-db --corpus=$CORPUS --tokenizer=$WORK/tokenizer/spm.model --output=$WORK/db      --chunk_size=32 --bert=hashing:4096
echo "=== $(date +%T) retro-precompute-neighbors --db=$WORK/db --output=$WORK/db_nb --k=10"; /usr/bin/time -f "wall %e s, peak RSS %M kB" retro-precompute-neighbors --db=$WORK/db --output=$WORK/db_nb --k=10
echo "=== $(date +%T) retro-show-neighbors --db=$WORK/db --text="the first line of a document you know" --k=2"; /usr/bin/time -f "wall %e s, peak RSS %M kB" retro-show-neighbors --db=$WORK/db --text="the first line of a document you know" --k=2
echo "=== $(date +%T) retro-train --config=quickstart --workdir=$WORK/retro      --config.data.db_dir=$WORK/db --config.data.neighbors_dir=$WORK/db_nb"; /usr/bin/time -f "wall %e s, peak RSS %M kB" retro-train --config=quickstart --workdir=$WORK/retro      --config.data.db_dir=$WORK/db --config.data.neighbors_dir=$WORK/db_nb
echo "=== $(date +%T) retro-train --config=quickstart_baseline --workdir=$WORK/baseline      --config.data.db_dir=$WORK/db"; /usr/bin/time -f "wall %e s, peak RSS %M kB" retro-train --config=quickstart_baseline --workdir=$WORK/baseline      --config.data.db_dir=$WORK/db
echo "=== $(date +%T) retro-evaluate --workdir=$WORK/retro --baseline_workdir=$WORK/baseline --corpus=$HELDOUT      --db=$WORK/db --ks=1,2,4 --output=$WORK/report.json"; /usr/bin/time -f "wall %e s, peak RSS %M kB" retro-evaluate --workdir=$WORK/retro --baseline_workdir=$WORK/baseline --corpus=$HELDOUT      --db=$WORK/db --ks=1,2,4 --output=$WORK/report.json
echo "=== $(date +%T) retro-generate --workdir=$WORK/retro --db=$WORK/db --prompt="The "      --max_new_tokens=64 --temperature=0.8 --top_p=0.95 --seed=0 --show_neighbors"; /usr/bin/time -f "wall %e s, peak RSS %M kB" retro-generate --workdir=$WORK/retro --db=$WORK/db --prompt="The "      --max_new_tokens=64 --temperature=0.8 --top_p=0.95 --seed=0 --show_neighbors
retro-serve --db=$WORK/db --port=8765 &
SERVER=$!
until curl -sf http://127.0.0.1:8765/health > /dev/null; do sleep 1; done
curl -s -X POST http://127.0.0.1:8765/retrieve -d '{"texts": ["The "], "k": 2}'
kill $SERVER
echo "=== $(date +%T) retro-verify $WORK/db"; /usr/bin/time -f "wall %e s, peak RSS %M kB" retro-verify $WORK/db
echo "=== $(date +%T) retro-verify $WORK/retro"; /usr/bin/time -f "wall %e s, peak RSS %M kB" retro-verify $WORK/retro
