-- description: Failed DNS lookups by client workload and the name the application asked for. Resolvers try a
--   name with each search domain before the name itself (ndots:5: `api.example.com` is asked as
--   `api.example.com.<ns>.svc.cluster.local.`, `...svc.cluster.local.`, `...cluster.local.`, then the node's own
--   search domains, then `api.example.com.`) and stop at the first name that exists, so NXDOMAIN answers to
--   these expansions are how lookups work, not failures. The question therefore counts lookups: a client's
--   answers for one stem (the name minus a search suffix) across its search-path expansions, per query type,
--   form one lookup. A lookup of which one name resolved (NOERROR) is no failure. `kind` says what failed:
--   `rcode` (every name failed, the final name too: `query` is the stem, `rcode_name` the final name's answer,
--   NXDOMAIN for a typo'd service, SERVFAIL, REFUSED, ...), `unresolved_final_not_seen` (every name seen
--   failed, but the name itself was never seen, e.g. asked by node-local-dns of an upstream server the capture
--   does not show: lower confidence, it may have resolved; `rcode_name` is the last answer seen), `no_answer`
--   (a request that got no response within `timeout_seconds`; requests and responses are paired by client
--   address, client port, query name and query types, since flows carry no DNS id; requests too close to the
--   end of the data to tell are left out), `dropped` (DNS requests the datapath or the DNS proxy dropped).
--   `failures` counts failed lookups (packets for `dropped`, requests for `no_answer`); `names` lists the query
--   names seen for them. `lookups` is every lookup of that workload in the window (answered lookups grouped as
--   here, requests whose name got no answer in time, dropped DNS packets), and `failure_share` = failures /
--   lookups.
--   `include_search_expansions=true` shows every error answer as it came instead (`kind` `rcode`, one row per
--   query name). `example_pods` lists up to three client pods. A workload whose DNS traffic (port 53) is visible
--   only at L3/L4 (no L7 DNS records, so rcodes cannot be seen) gets one row of kind `no_l7_visibility` instead
--   of an empty answer; `note` says what to do. `show_lookups=true` adds one row of kind `lookups` per client
--   workload, failed or not, with its `lookups` (the denominator of `failure_share`; how the
--   `flowpipe_dns_lookups` gauge counts every lookup). A namespace filter matches the client.
-- How a lookup is found. Search suffixes: `<namespace>.svc.<domain>.` (position 1; any namespace, since a
--   forwarder such as node-local-dns asks for pods of every namespace), `svc.<domain>.` (2), `<domain>.` (3), a
--   node search domain (4), none (the name itself: 5, or 0 for names with five dots or more, which ndots:5 asks
--   first). Cluster domains: `cluster.local.` and every `<domain>` in which a name
--   `<service>.<namespace>.svc.<domain>.` resolved. Node search domains are not known in advance: a domain is one
--   when clients of the cluster asked it appended to at least two different stems that the same clients also
--   asked with one of their cluster search suffixes, and every such name was NXDOMAIN (e.g. `c.<project>.internal.`
--   and `google.internal.` on GKE); with a single such stem in the window the domain is not recognised. Each
--   answer is a candidate expansion of every stem its name yields; a client's answers of one stem and query type
--   belong to one lookup while they follow each other within `timeout_seconds` in search order (an earlier
--   position, or the same name again, starts a new lookup); each answer is then given to the candidate lookup with
--   the most answers (ties: the client's own namespace, the earlier position, the shorter stem). The final name
--   is the stem itself; a lookup whose final name was asked but not answered is reported as `no_answer` only.
-- params: since=1h, until=now, namespace=, timeout_seconds=5.0, include_search_expansions=false, show_lookups=false,
--   limit=500
WITH dns AS (
    -- Every DNS record of the window in one scan: L7 records from Cilium's DNS proxy (`layer` l7; the client
    -- is the source of a request and the destination of a response) and requests to port 53 seen at L3/L4
    -- (`layer` l3). Folded by all its columns (`n` counts identical rows) so that it is computed once.
    SELECT
        layer, cluster_name, client_namespace, client_workload, client_id, client_pod, client_ip, client_port,
        l7_type, verdict, dns_query, dns_qtypes, dns_rcode_name, time,
        count(*) AS n
    FROM (
        SELECT
            CASE WHEN l7_protocol = 'dns' THEN 'l7' ELSE 'l3' END AS layer,
            cluster_name,
            CASE WHEN l7_type = 'RESPONSE' THEN destination_namespace ELSE source_namespace END AS client_namespace,
            CASE WHEN l7_type = 'RESPONSE' THEN destination_workload ELSE source_workload END AS client_workload,
            CASE WHEN l7_type = 'RESPONSE' THEN destination_workload_id ELSE source_workload_id END AS client_id,
            CASE WHEN l7_type = 'RESPONSE' THEN destination_pod_name ELSE source_pod_name END AS client_pod,
            CASE WHEN l7_type = 'RESPONSE' THEN destination_ip ELSE source_ip END AS client_ip,
            CASE WHEN l7_type = 'RESPONSE' THEN destination_port ELSE source_port END AS client_port,
            l7_type,
            verdict,
            dns_query,
            dns_qtypes,
            dns_rcode_name,
            time
        FROM flows_enriched
        WHERE time >= $since
          AND time <= $until
          AND (
              (l7_protocol = 'dns' AND l7_type IN ('REQUEST', 'RESPONSE'))
              OR (
                  destination_port = 53
                  AND is_request
                  AND l4_protocol IN ('UDP', 'TCP')
                  AND (l7_protocol IS NULL OR l7_protocol <> 'dns')
                  -- A denied packet is reported twice, as a policy-verdict event and as a drop: count the drop.
                  AND (event_type IS NULL OR event_type <> 5)
              )
          )
    ) AS d
    GROUP BY
        layer, cluster_name, client_namespace, client_workload, client_id, client_pod, client_ip, client_port,
        l7_type, verdict, dns_query, dns_qtypes, dns_rcode_name, time
),
dns_l7 AS (
    SELECT * FROM dns WHERE layer = 'l7'
),
dns_l3 AS (
    SELECT * FROM dns WHERE layer = 'l3'
),
clients AS (
    SELECT cluster_name, client_namespace, client_workload, client_id, client_pod FROM dns_l7
    UNION
    SELECT cluster_name, client_namespace, client_workload, client_id, client_pod FROM dns_l3
),
answers AS (
    -- Every L7 DNS answer with its resolver (`client_key`: one client address of one pod), its query types as one
    -- key (a resolver sends one query per type: A and AAAA are two lookups) and its own key (`answer_key`).
    SELECT
        d.*,
        d.client_key || '|' || d.qtypes || '|' || d.dns_query || '|' || CAST(d.time AS VARCHAR) || '|'
            || coalesce(CAST(d.client_port AS VARCHAR), '') || '|' || d.dns_rcode_name || '|'
            || coalesce(d.verdict, '') AS answer_key
    FROM (
        SELECT
            coalesce(cluster_name, '') || '|' || coalesce(client_ip, '') || '|' || coalesce(client_id, '') || '|'
                || coalesce(client_pod, '') AS client_key,
            cluster_name, client_namespace, client_workload, client_id, client_pod, client_ip, client_port, verdict,
            dns_query,
            coalesce(array_to_string(dns_qtypes, ','), '') AS qtypes,
            dns_rcode_name,
            time,
            n
        FROM dns_l7
        WHERE l7_type = 'RESPONSE'
          AND dns_query IS NOT NULL
          AND dns_rcode_name IS NOT NULL
    ) AS d
),
cluster_domains AS (
    SELECT 'cluster.local.' AS domain
    UNION
    SELECT regexp_extract(dns_query, '^[^.]+\.[^.]+\.svc\.(.+)', 1) AS domain
    FROM answers
    WHERE dns_rcode_name = 'NOERROR' AND regexp_extract(dns_query, '^[^.]+\.[^.]+\.svc\.(.+)', 1) <> ''
),
svc_stems AS (
    -- `<stem>.svc.<domain>.`: position 2.
    SELECT a.*, substr(a.dns_query, 1, length(a.dns_query) - length(d.domain) - 5) AS stem
    FROM answers AS a
    JOIN cluster_domains AS d
        ON length(a.dns_query) > length(d.domain) + 5
        AND substr(a.dns_query, length(a.dns_query) - length(d.domain) - 4) = '.svc.' || d.domain
),
cluster_candidates AS (
    -- Each answer as an expansion of a stem by a cluster search suffix; `own`: the client's own namespace.
    SELECT
        answer_key, client_key, cluster_name, client_namespace, client_workload, client_id, client_pod, client_ip,
        dns_query, qtypes, dns_rcode_name, time, n,
        regexp_extract(stem, '^(.+)\.[^.]+', 1) AS stem,
        1 AS pos,
        regexp_extract(stem, '^.*\.([^.]+)', 1) = client_namespace AS own
    FROM svc_stems
    WHERE regexp_extract(stem, '^(.+)\.[^.]+', 1) <> ''
    UNION ALL
    SELECT
        answer_key, client_key, cluster_name, client_namespace, client_workload, client_id, client_pod, client_ip,
        dns_query, qtypes, dns_rcode_name, time, n, stem, 2 AS pos, false AS own
    FROM svc_stems
    UNION ALL
    SELECT
        a.answer_key, a.client_key, a.cluster_name, a.client_namespace, a.client_workload, a.client_id,
        a.client_pod, a.client_ip, a.dns_query, a.qtypes, a.dns_rcode_name, a.time, a.n,
        substr(a.dns_query, 1, length(a.dns_query) - length(d.domain) - 1) AS stem, 3 AS pos, false AS own
    FROM answers AS a
    JOIN cluster_domains AS d
        ON length(a.dns_query) > length(d.domain) + 1
        AND substr(a.dns_query, length(a.dns_query) - length(d.domain)) = '.' || d.domain
),
searched AS (
    -- Stems a client asked with one of its own cluster search suffixes.
    SELECT DISTINCT client_key, cluster_name, stem
    FROM cluster_candidates
    WHERE pos > 1 OR own
),
outside_answers AS (
    -- Answers for names outside every cluster domain.
    SELECT a.*
    FROM answers AS a
    WHERE NOT EXISTS (
        SELECT 1
        FROM cluster_domains AS d
        WHERE length(a.dns_query) > length(d.domain)
          AND substr(a.dns_query, length(a.dns_query) - length(d.domain)) = '.' || d.domain
    )
),
node_domain_evidence AS (
    -- A searched stem asked with another suffix, outside the cluster domains: maybe a node search domain.
    SELECT
        s.cluster_name,
        s.stem,
        substr(a.dns_query, length(s.stem) + 2) AS domain,
        a.dns_rcode_name
    FROM searched AS s
    JOIN outside_answers AS a
        ON a.client_key = s.client_key
        AND length(a.dns_query) > length(s.stem) + 2
        AND substr(a.dns_query, 1, length(s.stem) + 1) = s.stem || '.'
),
node_domains AS (
    -- Appended to two stems or more, and NXDOMAIN every time.
    SELECT cluster_name, domain
    FROM node_domain_evidence
    GROUP BY cluster_name, domain
    HAVING max(CASE WHEN dns_rcode_name = 'NXDOMAIN' THEN 0 ELSE 1 END) = 0 AND count(DISTINCT stem) >= 2
),
candidates AS (
    SELECT * FROM cluster_candidates
    UNION ALL
    SELECT
        a.answer_key, a.client_key, a.cluster_name, a.client_namespace, a.client_workload, a.client_id,
        a.client_pod, a.client_ip, a.dns_query, a.qtypes, a.dns_rcode_name, a.time, a.n,
        substr(a.dns_query, 1, length(a.dns_query) - length(d.domain) - 1) AS stem, 4 AS pos, false AS own
    FROM outside_answers AS a
    JOIN node_domains AS d
        ON coalesce(d.cluster_name, '') = coalesce(a.cluster_name, '')
        AND length(a.dns_query) > length(d.domain) + 1
        AND substr(a.dns_query, length(a.dns_query) - length(d.domain)) = '.' || d.domain
    UNION ALL
    -- The name itself: asked last, or first when it has five dots or more (ndots:5).
    SELECT
        answer_key, client_key, cluster_name, client_namespace, client_workload, client_id, client_pod, client_ip,
        dns_query, qtypes, dns_rcode_name, time, n,
        rtrim(dns_query, '.') AS stem,
        CASE WHEN length(rtrim(dns_query, '.')) - length(replace(rtrim(dns_query, '.'), '.', '')) >= 5 THEN 0
            ELSE 5 END AS pos,
        false AS own
    FROM answers
),
starts AS (
    -- Candidate lookups: a new one starts after a gap, at an earlier search position, or at the same name again.
    SELECT
        c.*,
        CASE
            WHEN lag(c.time) OVER w IS NULL THEN 1
            WHEN date_diff('microsecond', lag(c.time) OVER w, c.time) > $timeout_seconds * 1000000 THEN 1
            WHEN c.pos < lag(c.pos) OVER w THEN 1
            WHEN c.pos = lag(c.pos) OVER w AND c.dns_query = lag(c.dns_query) OVER w THEN 1
            ELSE 0
        END AS starts
    FROM candidates AS c
    WHERE c.stem <> ''
    WINDOW w AS (PARTITION BY c.client_key, c.qtypes, c.stem ORDER BY c.time, c.pos, c.answer_key)
),
numbered AS (
    SELECT
        s.*,
        sum(s.starts) OVER (
            PARTITION BY s.client_key, s.qtypes, s.stem ORDER BY s.time, s.pos, s.answer_key
            ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
        ) AS lookup_no
    FROM starts AS s
),
ranked AS (
    SELECT
        n.*,
        row_number() OVER (
            PARTITION BY n.answer_key
            ORDER BY n.size DESC, CASE WHEN n.own THEN 0 ELSE 1 END, n.pos, length(n.stem), n.stem
        ) AS choice
    FROM (
        SELECT m.*, count(*) OVER (PARTITION BY m.client_key, m.qtypes, m.stem, m.lookup_no) AS size
        FROM numbered AS m
    ) AS n
),
chosen AS (
    -- Each answer in the lookup it most likely belongs to; `last_rcode`: the answer to its latest name.
    SELECT
        r.*,
        first_value(r.dns_rcode_name) OVER (
            PARTITION BY r.client_key, r.qtypes, r.stem, r.lookup_no
            ORDER BY r.pos DESC, r.time DESC, r.answer_key
        ) AS last_rcode
    FROM ranked AS r
    WHERE r.choice = 1
),
found_lookups AS (
    SELECT
        g.*,
        CASE WHEN g.resolved = 0 AND g.final_seen = 0 AND EXISTS (
            SELECT 1
            FROM dns_l7 AS q
            WHERE q.l7_type = 'REQUEST'
              AND coalesce(q.cluster_name, '') = coalesce(g.cluster_name, '')
              AND q.client_ip = g.client_ip
              AND q.dns_query = g.stem || '.'
              AND q.time >= g.first_time
              AND date_diff('microsecond', g.last_time, q.time) <= $timeout_seconds * 1000000
        ) THEN 1 ELSE 0 END AS final_asked
    FROM (
        SELECT
            client_key,
            qtypes,
            stem,
            lookup_no,
            min(cluster_name) AS cluster_name,
            min(client_namespace) AS client_namespace,
            min(client_workload) AS client_workload,
            min(client_id) AS client_id,
            min(client_pod) AS client_pod,
            min(client_ip) AS client_ip,
            max(CASE WHEN dns_rcode_name = 'NOERROR' THEN 1 ELSE 0 END) AS resolved,
            max(CASE WHEN pos IN (0, 5) THEN 1 ELSE 0 END) AS final_seen,
            max(CASE WHEN pos IN (0, 5) THEN dns_rcode_name END) AS final_rcode,
            min(last_rcode) AS last_rcode,
            min(time) AS first_time,
            max(time) AS last_time
        FROM chosen
        GROUP BY client_key, qtypes, stem, lookup_no
    ) AS g
),
horizon AS (
    -- A request can only be judged unanswered once the data reaches `timeout_seconds` past it.
    SELECT max(time) AS newest FROM dns_l7
),
request_answers AS (
    -- Each forwarded request with whether an answer of its name and type reached its client within
    -- `timeout_seconds`: on its own port (`in_time`, its answer) or on any port (`any_port`).
    SELECT
        q.cluster_name, q.client_namespace, q.client_workload, q.client_id, q.client_pod, q.client_ip,
        q.client_port, q.dns_query, q.dns_qtypes, q.time, q.n,
        max(CASE WHEN r.client_port = q.client_port THEN 1 ELSE 0 END) AS in_time,
        max(CASE WHEN r.time IS NULL THEN 0 ELSE 1 END) AS any_port
    FROM dns_l7 AS q
    LEFT JOIN dns_l7 AS r
        ON r.l7_type = 'RESPONSE'
        -- pod addresses repeat across clusters: an answer counts in the cluster of its request
        AND coalesce(r.cluster_name, '') = coalesce(q.cluster_name, '')
        AND r.client_ip = q.client_ip
        AND r.dns_query = q.dns_query
        AND (cardinality(r.dns_qtypes) = 0 OR cardinality(q.dns_qtypes) = 0 OR r.dns_qtypes = q.dns_qtypes)
        AND r.time >= q.time
        AND date_diff('microsecond', q.time, r.time) <= $timeout_seconds * 1000000
    WHERE q.l7_type = 'REQUEST'
      AND q.verdict = 'FORWARDED'
    GROUP BY
        q.cluster_name, q.client_namespace, q.client_workload, q.client_id, q.client_pod, q.client_ip,
        q.client_port, q.dns_query, q.dns_qtypes, q.time, q.n, q.layer, q.l7_type, q.verdict, q.dns_rcode_name
),
unanswered AS (
    SELECT a.*
    FROM request_answers AS a
    CROSS JOIN horizon AS h
    WHERE a.in_time = 0
      AND date_diff('microsecond', a.time, h.newest) >= $timeout_seconds * 1000000
),
never_answered AS (
    -- Requests whose name got no answer in time on any port (judged or not yet): each is a lookup of its own.
    SELECT * FROM request_answers WHERE any_port = 0
),
lookups AS (
    -- Every lookup of a workload: answered lookups (grouped across their search-path expansions), requests whose
    -- name got no answer in time (an answered lookup whose final name got none counts there), dropped packets.
    SELECT
        c.cluster_name,
        c.client_id,
        coalesce(a.lookups, 0) + coalesce(u.unanswered, 0) + coalesce(l7.dropped, 0) + coalesce(l3.dropped, 0)
            AS lookups,
        coalesce(l7.records, 0) AS l7_records,
        coalesce(l3.packets, 0) AS l3_packets
    FROM (SELECT DISTINCT cluster_name, client_id FROM clients) AS c
    LEFT JOIN (
        SELECT
            cluster_name,
            client_id,
            CAST(sum(CASE WHEN l7_type = 'REQUEST' AND verdict = 'DROPPED' THEN n ELSE 0 END) AS BIGINT) AS dropped,
            CAST(sum(n) AS BIGINT) AS records
        FROM dns_l7
        GROUP BY cluster_name, client_id
    ) AS l7 ON l7.client_id = c.client_id AND coalesce(l7.cluster_name, '') = coalesce(c.cluster_name, '')
    LEFT JOIN (
        SELECT
            cluster_name,
            client_id,
            CAST(sum(CASE WHEN verdict = 'DROPPED' THEN n ELSE 0 END) AS BIGINT) AS dropped,
            CAST(sum(n) AS BIGINT) AS packets
        FROM dns_l3
        GROUP BY cluster_name, client_id
    ) AS l3 ON l3.client_id = c.client_id AND coalesce(l3.cluster_name, '') = coalesce(c.cluster_name, '')
    LEFT JOIN (
        SELECT f.cluster_name, f.client_id, count(*) AS lookups
        FROM found_lookups AS f
        WHERE f.final_asked = 0 OR NOT EXISTS (
            SELECT 1
            FROM never_answered AS u
            WHERE coalesce(u.cluster_name, '') = coalesce(f.cluster_name, '')
              AND u.client_ip = f.client_ip
              AND u.dns_query = f.stem || '.'
              AND u.time >= f.first_time
              AND date_diff('microsecond', f.last_time, u.time) <= $timeout_seconds * 1000000
        )
        GROUP BY f.cluster_name, f.client_id
    ) AS a ON a.client_id = c.client_id AND coalesce(a.cluster_name, '') = coalesce(c.cluster_name, '')
    LEFT JOIN (
        SELECT cluster_name, client_id, CAST(sum(n) AS BIGINT) AS unanswered
        FROM never_answered
        GROUP BY cluster_name, client_id
    ) AS u ON u.client_id = c.client_id AND coalesce(u.cluster_name, '') = coalesce(c.cluster_name, '')
),
failures AS (
    -- One row per counted unit: a failed lookup (`lookup_key`), or `n` error answers, requests or packets.
    SELECT
        CASE WHEN f.final_seen = 1 THEN 'rcode' ELSE 'unresolved_final_not_seen' END AS kind,
        c.cluster_name, c.client_namespace, c.client_workload, c.client_id, c.client_pod, f.stem AS dns_query,
        CASE WHEN f.final_seen = 1 THEN f.final_rcode ELSE f.last_rcode END AS rcode_name,
        c.dns_query AS name,
        c.client_key || '|' || c.qtypes || '|' || c.stem || '|' || CAST(c.lookup_no AS VARCHAR) AS lookup_key,
        c.time,
        c.n
    FROM found_lookups AS f
    JOIN chosen AS c
        ON c.client_key = f.client_key AND c.qtypes = f.qtypes AND c.stem = f.stem AND c.lookup_no = f.lookup_no
    WHERE NOT $include_search_expansions
      AND f.resolved = 0
      AND (f.final_seen = 1 OR f.final_asked = 0)
    UNION ALL
    SELECT 'rcode', cluster_name, client_namespace, client_workload, client_id, client_pod, dns_query,
        dns_rcode_name, dns_query, CAST(NULL AS VARCHAR), time, n
    FROM dns_l7
    WHERE $include_search_expansions
      AND l7_type = 'RESPONSE'
      AND dns_rcode_name IS NOT NULL
      AND dns_rcode_name <> 'NOERROR'
    UNION ALL
    SELECT 'no_answer', cluster_name, client_namespace, client_workload, client_id, client_pod, dns_query,
        CAST(NULL AS VARCHAR), dns_query, CAST(NULL AS VARCHAR), time, n
    FROM unanswered
    UNION ALL
    SELECT 'dropped', cluster_name, client_namespace, client_workload, client_id, client_pod, dns_query,
        CAST(NULL AS VARCHAR), dns_query, CAST(NULL AS VARCHAR), time, n
    FROM dns_l7
    WHERE l7_type = 'REQUEST' AND verdict = 'DROPPED'
    UNION ALL
    SELECT 'dropped', cluster_name, client_namespace, client_workload, client_id, client_pod,
        CAST(NULL AS VARCHAR), CAST(NULL AS VARCHAR), CAST(NULL AS VARCHAR), CAST(NULL AS VARCHAR), time, n
    FROM dns_l3
    WHERE verdict = 'DROPPED'
),
grouped AS (
    SELECT
        f.kind,
        f.cluster_name,
        f.client_namespace,
        f.client_workload,
        f.client_id,
        f.dns_query,
        f.rcode_name,
        CAST(sum(CASE WHEN f.lookup_key IS NULL THEN f.n ELSE 0 END) + count(DISTINCT f.lookup_key) AS BIGINT)
            AS failures,
        -- NULL where no name is known (packets dropped before the DNS proxy), an empty list on no engine
        CASE WHEN count(f.name) > 0 THEN
            array_slice(list_sort(array_agg(DISTINCT f.name) FILTER (WHERE f.name IS NOT NULL)), 1, 8)
        END AS names,
        min(f.time) AS first_seen,
        max(f.time) AS last_seen,
        array_slice(list_sort(coalesce(array_agg(DISTINCT f.client_pod) FILTER (WHERE f.client_pod IS NOT NULL), [])), 1, 3) AS example_pods
    FROM failures AS f
    GROUP BY f.kind, f.cluster_name, f.client_namespace, f.client_workload, f.client_id, f.dns_query, f.rcode_name
),
client_rows AS (
    -- Port 53 traffic of a workload without any L7 DNS record (kind `no_l7_visibility`: rcodes and unanswered
    -- lookups cannot be seen), and with `show_lookups=true` every DNS record of every client (kind `lookups`).
    SELECT 'no_l7_visibility' AS kind, d.*
    FROM dns_l3 AS d
    JOIN lookups AS c ON c.client_id = d.client_id AND coalesce(c.cluster_name, '') = coalesce(d.cluster_name, '')
    WHERE c.l7_records = 0
      AND d.verdict <> 'DROPPED'
    UNION ALL
    SELECT 'lookups' AS kind, d.*
    FROM dns AS d
    WHERE $show_lookups
),
per_client AS (
    -- One row per kind and client workload, for its count of lookups (or of L3/L4 packets) below.
    SELECT
        d.kind,
        d.cluster_name,
        min(d.client_namespace) AS client_namespace,
        min(d.client_workload) AS client_workload,
        d.client_id,
        CAST(NULL AS VARCHAR) AS dns_query,
        CAST(NULL AS VARCHAR) AS rcode_name,
        CAST(NULL AS BIGINT) AS failures,
        CAST(NULL AS VARCHAR[]) AS names,
        min(d.time) AS first_seen,
        max(d.time) AS last_seen,
        array_slice(list_sort(coalesce(array_agg(DISTINCT d.client_pod) FILTER (WHERE d.client_pod IS NOT NULL), [])), 1, 3) AS example_pods
    FROM client_rows AS d
    GROUP BY d.kind, d.cluster_name, d.client_id
)
SELECT
    g.kind,
    g.client_namespace AS source_namespace,
    g.client_workload AS source_workload,
    g.dns_query AS query,
    g.rcode_name,
    g.failures,
    CASE WHEN g.kind = 'no_l7_visibility' THEN l.l3_packets ELSE l.lookups END AS lookups,
    round(CAST(g.failures AS DOUBLE) / nullif(l.lookups, 0), 4) AS failure_share,
    g.first_seen,
    g.last_seen,
    g.example_pods,
    g.names,
    CASE
        WHEN g.kind = 'no_l7_visibility' THEN
            'DNS of this workload is visible only at L3/L4 (port 53 packets, no DNS records): failed lookups '
            || 'cannot be seen. Add a DNS rule (toPorts rules dns matchPattern "*") to its egress policy to '
            || 'get L7 DNS visibility.'
        WHEN g.kind = 'no_answer' THEN 'no response within the timeout'
        WHEN g.kind = 'unresolved_final_not_seen' THEN
            'every name seen failed, but the name itself was never seen (asked of a server the capture does not '
            || 'show, e.g. by node-local-dns upstream): it may have resolved'
        WHEN g.kind = 'dropped' AND g.dns_query IS NULL THEN 'DNS packets dropped before the DNS proxy'
        WHEN g.kind = 'dropped' THEN 'lookup dropped by the DNS proxy'
        WHEN g.kind = 'lookups' THEN 'every lookup of this workload in the window, failed or not'
    END AS note,
    g.cluster_name
FROM (
    SELECT * FROM grouped
    UNION ALL
    SELECT * FROM per_client
) AS g
LEFT JOIN lookups AS l ON l.client_id = g.client_id AND coalesce(l.cluster_name, '') = coalesce(g.cluster_name, '')
WHERE $namespace IS NULL OR g.client_namespace = $namespace
ORDER BY
    CASE g.kind WHEN 'rcode' THEN 1 WHEN 'no_answer' THEN 2 WHEN 'dropped' THEN 3
        WHEN 'unresolved_final_not_seen' THEN 4 WHEN 'no_l7_visibility' THEN 5 ELSE 6 END,
    g.failures DESC NULLS LAST,
    g.client_namespace NULLS LAST,
    g.client_workload NULLS LAST,
    g.dns_query NULLS LAST,
    g.rcode_name NULLS LAST
LIMIT $limit
