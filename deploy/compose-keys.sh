#!/bin/sh
# The docker-compose.yml key setup (its one-shot `keygen` service), then each service's share.
#
# Everything is created once in $KEYS (the `keys` volume, which only this script mounts):
# a signing seed per identity, the roster of their public keys and the cluster secret
# (deploy/keygen.py, which keeps what exists), and the RPC root key with its public keyring.
# A token for the demo writer (RPC `get` on orders) is minted on every run, so a restarted
# stack never holds an expired one.
#
# Then each service gets only what it reads, in its own volume mounted at $OUT/<service>:
# a worknode its seed, the roster, the cluster secret and the RPC keyring; the healer its
# seed, the roster and the cluster secret; the writer its seed, the roster and its token.
# No service but this one sees another's seed or the RPC root key. The cluster secret is
# shared by design (every replica and the healer key their Merkle trees with it).
#
# Usage: compose-keys.sh NODE [NODE ...]   (the worknode services; "healer" and "writer"
# are always set up). Environment: KEYS, OUT, OWNER (the uid the services run as),
# KEYGEN (path of keygen.py), NAMESPACE, SUBJECT, TOKEN_TTL (seconds).
set -eu

KEYS=${KEYS:-/var/lib/worknode/keys}
OUT=${OUT:-/keys}
OWNER=${OWNER:-10001}
KEYGEN=${KEYGEN:-/usr/local/lib/worknode/keygen.py}
NAMESPACE=${NAMESPACE:-demo}
SUBJECT=${SUBJECT:-orders}
TOKEN_TTL=${TOKEN_TTL:-2592000}

[ "$#" -gt 0 ] || { echo "usage: $0 NODE [NODE ...]" >&2; exit 2; }

python "$KEYGEN" "$KEYS" "$@" healer writer
if [ ! -f "$KEYS/rpc-root.key" ]; then
    worknode token keygen --key-id 1 --out "$KEYS/rpc-root.key" --keyring "$KEYS/rpc-keyring.json"
fi
# Written beside, then renamed: a writer reading the token never sees half of it.
worknode token mint --root-key "$KEYS/rpc-root.key" --namespace "$NAMESPACE" \
    --subject "$SUBJECT" --method get --ttl "$TOKEN_TTL" > "$KEYS/writer.token.new"
mv "$KEYS/writer.token.new" "$KEYS/writer.token"

# give SERVICE FILE...: copy FILEs from $KEYS into $OUT/SERVICE, owned by $OWNER, mode 0600.
give() {
    dir="$OUT/$1"
    shift
    mkdir -p "$dir"
    for f in "$@"; do
        cp "$KEYS/$f" "$dir/$f.new"
        chmod 600 "$dir/$f.new"
        chown "$OWNER" "$dir/$f.new"
        mv "$dir/$f.new" "$dir/$f"
    done
}

for node in "$@"; do
    give "$node" "$node.key" roster.json cluster.secret rpc-keyring.json
done
give healer healer.key roster.json cluster.secret
give writer writer.key roster.json writer.token
echo "keys given to: $* healer writer"
