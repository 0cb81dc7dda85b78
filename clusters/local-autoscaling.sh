#!/usr/bin/env bash
# Starts the head of the one-machine autoscaling cluster of clusters/local-autoscaling.yaml in the
# foreground: `ray start --head --block` with Ray's autoscaler driving the fake multi-node
# provider. Ctrl-C (or SIGTERM to its process group) stops the head and every node it launched.
#   bash clusters/local-autoscaling.sh
# Environment: RAY_PORT (GCS, default 6379), RAY_DASHBOARD_PORT (default 8265); further
# arguments go to `ray start`. Stop it before starting another Ray on the same ports.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
port=${RAY_PORT:-6379}
dashboard=${RAY_DASHBOARD_PORT:-8265}
head=fffffffffffffffffffffffffffffffffffffffffffffffffff00000  # the provider's head_node_id

# The autoscaler re-reads its config on every update: keep the copy for the head's lifetime.
# RAYDSNAS_AUTOSCALING_CONFIG: another cluster file of the same form (a test's).
config=$(mktemp -t raydsnas-autoscaling.XXXXXX.yaml)
sed "s/127\.0\.0\.1:6379/127.0.0.1:${port}/" \
    "${RAYDSNAS_AUTOSCALING_CONFIG:-${here}/local-autoscaling.yaml}" > "${config}"

# The fake provider needs RAY_FAKE_CLUSTER, and the head's Ray node and cloud instance to carry
# the provider's head id (so the autoscaler does not take the head for a node it must launch).
export RAY_FAKE_CLUSTER=1
export RAY_OVERRIDE_NODE_ID_FOR_TESTING=${head} RAY_CLOUD_INSTANCE_ID=${head}
# Autoscaler v2, as `ray up` starts it since Ray 2.50 (`ray start` alone would run v1).
export RAY_enable_autoscaler_v2=1
export AUTOSCALER_UPDATE_INTERVAL_S=${AUTOSCALER_UPDATE_INTERVAL_S:-2}
# Every node on loopback: Ray's nodes take 127.0.0.1 as their address (not the host's), gloo too.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
# Ray Train's run state for the dashboard's API (/api/train/v2/runs).
export RAY_TRAIN_ENABLE_STATE_TRACKING=1

exec ray start --head --block --port="${port}" --node-ip-address=127.0.0.1 --num-cpus=0 \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="${dashboard}" \
    --autoscaling-config="${config}" "$@"
