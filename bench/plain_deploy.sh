#!/usr/bin/env bash
# The document done by hand, automated: the commands deploy.ipynb's journal shows for sections 1-5,
# as one bash script over OpenSSH with ControlMaster (one connection per host, reused).
# Like the document it is NOT idempotent (a second run fails at `user create`: exit 17), prints
# secrets' files to disk in the clear, and checks nothing before acting.  Benchmark baseline only.
set -euo pipefail
RGW_HOST=${RGW_HOST:-198.18.0.2}; RGW_PORT=${RGW_PORT:-7480}
REG_HOST=${REG_HOST:-198.18.0.70}; REG_PORT=${REG_PORT:-8000}
RGW_UID=${RGW_UID:-bench}; CONTAINER=${CONTAINER:-bench-registry}
REG_USER=${REG_USER:-foo}; IMAGE=${IMAGE:-bench/hello:v1}
WORK=${WORK:-/tmp/plain-deploy}
KEY=${SSH_KEY:-/var/lib/runbook-lab/ssh/id_ed25519}; KH=${KNOWN_HOSTS:-/var/lib/runbook-lab/ssh/known_hosts}
T=$REG_HOST:$REG_PORT

mkdir -p "$WORK" && chmod 700 "$WORK" && cd "$WORK"
O=(-F /dev/null -i "$KEY" -o IdentitiesOnly=yes -o "UserKnownHostsFile=$KH" -o GlobalKnownHostsFile=/dev/null
   -o StrictHostKeyChecking=yes -o BatchMode=yes -o LogLevel=ERROR
   -o ControlMaster=auto -o "ControlPath=$WORK/cm-%h" -o ControlPersist=60)
# as the document: log in as k8s, sudo for what needs root
r() { local h=$1; shift; ssh "${O[@]}" "k8s@$h" sudo -n "$@"; }
trap 'for h in $RGW_HOST $REG_HOST; do ssh "${O[@]}" -O exit k8s@$h 2>/dev/null || true; done' EXIT

# -- 1. RGW (ceph-deploy rgw create RGW_HOST: already deployed, shared): it answers on 7480
r "$RGW_HOST" ceph -s >/dev/null
curl -sf -m 5 "http://$RGW_HOST:$RGW_PORT/" | grep -q ListAllMyBucketsResult

# -- 2. accounts: user, swift subuser, swift secret, S3 keys
r "$RGW_HOST" radosgw-admin user create --uid="$RGW_UID" --display-name="'ceph rgw demo user'" >/dev/null
r "$RGW_HOST" radosgw-admin subuser create --uid "$RGW_UID" --subuser="$RGW_UID:swift" --access=full \
  --key-type=swift >/dev/null
SWIFT_KEY=$(r "$RGW_HOST" radosgw-admin key create --subuser="$RGW_UID:swift" --key-type=swift --gen-secret \
  | jq -r --arg u "$RGW_UID:swift" '.swift_keys[] | select(.user == $u) | .secret_key')
r "$RGW_HOST" radosgw-admin key create --uid "$RGW_UID" --key-type=s3 --gen-access-key --gen-secret >/dev/null
curl -sf -o /dev/null -H "X-Auth-User: $RGW_UID:swift" -H "X-Auth-Key: $SWIFT_KEY" \
  "http://$RGW_HOST:$RGW_PORT/auth/v1"

# -- 3. certificates with cfssl (a CA made here; the document reuses its Kubernetes CA)
cat > ca-csr.json <<J
{"CN": "runbook registry CA", "key": {"algo": "rsa", "size": 2048}, "names": [{"O": "k8s"}]}
J
cat > ca-config.json <<J
{"signing": {"profiles": {"kubernetes": {"usages": ["signing", "key encipherment", "server auth", "client auth"],
 "expiry": "19800h"}}}}
J
cfssl gencert -initca ca-csr.json 2>/dev/null | cfssljson -bare ca
cat > registry-csr.json <<J
{"CN": "registry", "hosts": ["127.0.0.1", "$REG_HOST"], "key": {"algo": "rsa", "size": 2048},
 "names": [{"C": "CN", "ST": "BeiJing", "L": "BeiJing", "O": "k8s", "OU": "4Paradigm"}]}
J
cfssl gencert -ca=ca.pem -ca-key=ca-key.pem -config=ca-config.json -profile=kubernetes registry-csr.json \
  2>/dev/null | cfssljson -bare registry

# -- 4. registry: htpasswd (bcrypt cost 5, as the runbook), config.yml, scp -r, docker run
PASSWORD=$(openssl rand -base64 18)
mkdir -p registry/auth registry/certs
htpasswd -Bbn -C 5 "$REG_USER" "$PASSWORD" > registry/auth/htpasswd
cp registry.pem registry-key.pem registry/certs
cat > registry/config.yml <<Y
version: 0.1
log:
  level: info
  formatter: text
  fields:
    service: registry
storage:
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
  swift:
    authurl: http://$RGW_HOST:$RGW_PORT/auth/v1
    username: $RGW_UID:swift
    password: $SWIFT_KEY
    container: $CONTAINER
auth:
  htpasswd:
    realm: basic-realm
    path: /auth/htpasswd
http:
  addr: 0.0.0.0:$REG_PORT
  secret: $(openssl rand -hex 16)
  headers:
    X-Content-Type-Options: [nosniff]
  tls:
    certificate: /certs/registry.pem
    key: /certs/registry-key.pem
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
Y
r "$REG_HOST" mkdir -p /opt/k8s
scp "${O[@]}" -q -r registry "k8s@$REG_HOST:/tmp/"
r "$REG_HOST" sh -c "'rm -rf /opt/k8s/registry && mv /tmp/registry /opt/k8s/ && chown -R root:root /opt/k8s/registry'"
r "$REG_HOST" docker run -d --restart always --network host \
  -v /opt/k8s/registry/auth:/auth -v /opt/k8s/registry/certs:/certs \
  -v /opt/k8s/registry/config.yml:/etc/docker/registry/config.yml --name registry registry:2 >/dev/null
for i in $(seq 150); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' --cacert ca.pem "https://$T/v2/")" = 401 ] && break
  sleep 0.2
done

# -- 5. push: trust the CA, login, make the image (no pull possible here), tag, push, find it in RGW
mkdir -p "/etc/docker/certs.d/$T" && cp ca.pem "/etc/docker/certs.d/$T/ca.crt"
echo "$PASSWORD" | docker login "$T" -u "$REG_USER" --password-stdin >/dev/null
rm -rf rootfs && mkdir -p rootfs/bin rootfs/etc
cp "$(command -v busybox)" rootfs/bin/busybox && ln -s busybox rootfs/bin/sh
echo "stand-in for $IMAGE" > rootfs/etc/runbook-image
tar --sort=name --mtime=@1700000000 --owner=0 --group=0 --numeric-owner -C rootfs -cf rootfs.tar .
docker import --change 'CMD ["/bin/sh"]' rootfs.tar "$IMAGE" >/dev/null
docker tag "$IMAGE" "$T/$IMAGE"
docker push "$T/$IMAGE" >/dev/null
curl -sf --cacert ca.pem -u "$REG_USER:$PASSWORD" "https://$T/v2/_catalog" | grep -q "${IMAGE%%:*}"
r "$RGW_HOST" rados --pool default.rgw.buckets.data ls | grep -q "docker/registry/v2/repositories/${IMAGE%%:*}/"
echo "plain deploy: OK"
