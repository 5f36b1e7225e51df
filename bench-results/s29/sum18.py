import json,glob,sys
for f in sorted(glob.glob(sys.argv[1]+'/migrate-qemu-*.json')):
    r=json.load(open(f))
    pm=r['per_move']
    beyond=[m['lost_beyond_pause'] for m in pm]
    rel=[]
    for m in pm:
        old=m['relay'].get(m['from'],{}); new=m['relay'].get(m['to'],{})
        rel.append((old.get('copied'),new.get('held'),new.get('released'),new.get('expired')))
    print(f.split('/')[-1], 'ann',r['migration_announced'],'sent',r['probes_sent'],'lost',r['lost_total'],'inpause',r['lost_in_pause_total'],'beyond',r['lost_beyond_pause_total'],beyond,'dup',r['duplicate_replies_total'],'paused',r['paused_ms'],'conv',r['convergence_ms'])
    print('   relay(copied,held,released,expired)',rel)
    print('   dups',[m['duplicate_replies'] for m in pm], 'paused', [round(m.get('paused_ms') or 0,1) for m in pm])
