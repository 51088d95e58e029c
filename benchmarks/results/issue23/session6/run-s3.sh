cd /work/main
i=0
for spec in "inline,auto warm" "auto,inline warm" "inline,auto cold"; do
  set -- $spec; i=$((i+1)); tag=s3-$2-$i
  echo "== $tag $1 $(date +%T)"
  PYTHONPATH=$PWD timeout 1500 .venv/bin/python benchmarks/bench_s3.py --arch 7b --layers 16 --n 600 \
      --null-product --repeats 1 --modes "$1" --set-cache $2 --no-reader --out-json ${OUT:-/tmp/s23n}/$tag.json > ${OUT:-/tmp/s23n}/$tag.log 2>&1
  grep -E "^\|\s+0 " ${OUT:-/tmp/s23n}/$tag.log | cut -c1-120
done
echo ALLDONE
