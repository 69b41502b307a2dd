#!/bin/sh
# Creates the mirror's bucket in SeaweedFS, once its master answers, and exits 0 when the bucket is there (also
# when it already was): the one-shot service create-bucket of docker-compose.yml, which the replicas wait for.
#   SEAWEED_MASTER (seaweedfs:9333), BUCKET (mirror)
set -u
master="${SEAWEED_MASTER:-seaweedfs:9333}"
bucket="${BUCKET:-mirror}"
attempt=0
# weed shell waits for ever for a master that does not answer: each attempt gets 20 s.
until buckets=$(echo "s3.bucket.list" | timeout 20 weed shell -master="$master" 2>/dev/null); do
    attempt=$((attempt + 1))
    if [ "$attempt" -ge 30 ]; then
        echo "create-bucket: SeaweedFS's master $master did not answer" >&2
        exit 1
    fi
    sleep 2
done
if printf '%s\n' "$buckets" | grep -q "^ *$bucket[[:space:]]"; then
    echo "create-bucket: bucket $bucket is there"
    exit 0
fi
echo "s3.bucket.create -name $bucket" | timeout 60 weed shell -master="$master" || exit 1
echo "create-bucket: created bucket $bucket"
