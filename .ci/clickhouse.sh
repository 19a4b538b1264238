#!/usr/bin/env bash
# Starts the ClickHouse server the tests use (http://127.0.0.1:8123), unless one answers already.
# Installs Debian's clickhouse-server when it is missing, renders .ci/clickhouse/config.xml
# with a data directory of its own, starts the server in the background and waits for /ping.
#
#   CLICKHOUSE_DATA   data directory (default: $HOME/.cache/txbus-clickhouse)
#   CLICKHOUSE_WAIT   seconds to wait for /ping (default: 60)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="${CLICKHOUSE_DATA:-$HOME/.cache/txbus-clickhouse}"
wait_secs="${CLICKHOUSE_WAIT:-60}"
url="http://127.0.0.1:8123/ping"

answers() { curl -fsS --max-time 2 "$url" >/dev/null 2>&1; }

if answers; then
  echo "ClickHouse answers on $url"
  exit 0
fi

if ! command -v clickhouse-server >/dev/null; then
  echo "installing clickhouse-server"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clickhouse-server >/dev/null
fi

mkdir -p "$data"/{data,tmp,user_files,format_schemas,log}
sed "s|@DATA@|$data|g" "$here/clickhouse/config.xml" >"$data/config.xml"
cp "$here/clickhouse/users.xml" "$data/users.xml"

# A server of ours that died leaves its pid file behind; --daemon refuses to start over it.
pid_file="$data/clickhouse-server.pid"
if [ -f "$pid_file" ] && ! kill -0 "$(cat "$pid_file" 2>/dev/null)" 2>/dev/null; then
  rm -f "$pid_file"
fi

echo "starting ClickHouse (data in $data)"
clickhouse-server --daemon --config-file="$data/config.xml" --pid-file="$pid_file" \
  >>"$data/log/stdout.log" 2>&1 || true

for _ in $(seq 1 "$wait_secs"); do
  if answers; then
    echo "ClickHouse answers on $url"
    exit 0
  fi
  sleep 1
done
echo "ClickHouse did not answer on $url within ${wait_secs}s; see $data/log/" >&2
tail -n 20 "$data/log/clickhouse-server.err.log" >&2 2>/dev/null || true
exit 1
