#!/usr/bin/env python3
"""diff.py CASE_ID [NODE...]: run netmap compute on a corpus case and show expected vs got per failing node."""
import json,sys,subprocess,tempfile,os
sys.path.insert(0,'/work/shared/conformance')
import judge
BIN=os.environ.get('NETMAP_BIN','/work/main/target/release/netmap')
cid=sys.argv[1]; only=sys.argv[2:]
case=json.load(open(f'/work/shared/conformance/cases/{cid}.json'))
tmp=tempfile.mkdtemp()
pol=os.path.join(tmp,'p.hujson'); st=os.path.join(tmp,'s.json')
open(pol,'w').write(case['policy']); json.dump({"users":case["users"],"nodes":case["nodes"],"tailnet":case.get("tailnet") or {}},open(st,'w'))
r=subprocess.run([BIN,'compute','--policy',pol,'--state',st],capture_output=True,text=True)
print('policy:',case['policy'][:1500])
print('expect error:',case['expect']['error'],' rc',r.returncode, r.stderr[:300])
if r.returncode: sys.exit()
out=json.loads(r.stdout)
for name,exp in case['expect']['nodes'].items():
    if only and name not in only: continue
    got=out['nodes'].get(name,{})
    if judge.canon(exp.get('packet_filter') or [])!=judge.canon(got.get('packet_filter') or []):
        print(f'--- {name} packet_filter');
        E=[json.dumps(x,sort_keys=True) for x in judge.canon(exp.get('packet_filter') or [])]; G=[json.dumps(x,sort_keys=True) for x in judge.canon(got.get('packet_filter') or [])]
        for x in E:
            if x not in G: print('  EXP',x[:900])
        for x in G:
            if x not in E: print('  GOT',x[:900])
    e={p['name']:judge.norm_peer(p) for p in exp.get('peers') or []}; g={p['name']:judge.norm_peer(p) for p in got.get('peers') or []}
    if e!=g:
        print(f'--- {name} peers')
        for k in sorted(set(e)|set(g)):
            if e.get(k)!=g.get(k): print('  ',k,'EXP',e.get(k) and (e[k]['allowed_ips'],e[k]['primary_routes']),'GOT',g.get(k) and (g[k]['allowed_ips'],g[k]['primary_routes']))
    if 'ssh_rules' in exp and [judge.canon(x) for x in exp['ssh_rules']]!=[judge.canon(x) for x in got.get('ssh_rules') or []]:
        print(f'--- {name} ssh'); 
        for x in exp['ssh_rules']: print('  EXP',json.dumps(judge.canon(x))[:600])
        for x in got.get('ssh_rules') or []: print('  GOT',json.dumps(judge.canon(x))[:600])
    if case['category']=='nodeattrs' and judge.policy_caps((exp.get('self') or {}).get('cap_map'))!=judge.policy_caps(got.get('cap_map')):
        print(f'--- {name} caps EXP',json.dumps(judge.policy_caps((exp.get('self') or {}).get('cap_map'))),'GOT',json.dumps(judge.policy_caps(got.get('cap_map'))))
