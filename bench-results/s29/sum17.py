import json,sys
for f in sys.argv[1:]:
    r=json.load(open(f))
    print(f.split('/')[-1], 'completed', r.get('completed'), 'failed', r.get('failed'))
    for x in r['runs']:
        st=x['controller_stages_ms']
        print('  conv p50 %.1f p99 %.1f | commit p99 %.1f | fan p50 %.1f p99 %.1f | us/msg %.1f | cores %.2f | drops %s' % (x['convergence_ms']['p50'], x['convergence_ms']['p99'], st['commit']['p99'], st['fan_out']['p50'], st['fan_out']['p99'], x['controller_cost']['us_per_message'], x['controller_cost']['churn_cores'], x['delivery']['stream_drops']))
