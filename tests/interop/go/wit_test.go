package interop

// The WIT-SVID profile, judged by go-spiffe v2.9.0's WIT client: FetchWITSVID
// and FetchWITBundles through workloadapi.Client, validation with
// exp/svid/witsvid against the exp/bundle/witbundle set, watches that see a
// rotation (agent.sh sets wit_ttl = "6s"), and a proof of possession signed
// with the private key the agent handed out, checked with go-jose against
// the cnf key go-spiffe extracted; and token-guard's WitGuardLayer (its
// wit_guard_server example) accepting a go-jose Workload Proof Token made
// with that key, and refusing every forged, replayed or unbound one.

import (
	"bufio"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/exp/bundle/witbundle"
	"github.com/spiffe/go-spiffe/v2/exp/svid/witsvid"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// agent.sh configures wit_ttl = "6s".
const witTTL = 6 * time.Second

func witClient(t *testing.T) *workloadapi.Client {
	t.Helper()
	expectedID(t)
	c, err := workloadapi.New(timeout(t))
	if err != nil {
		t.Fatalf("workloadapi.New: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// checkWITSVID validates svid with go-spiffe against bundles and checks what
// the WIT-SVID spec requires of its header and claims.
func checkWITSVID(t *testing.T, svid *witsvid.SVID, bundles witbundle.Source) *witsvid.SVID {
	t.Helper()
	id := expectedID(t)
	if svid.ID != id {
		t.Fatalf("WIT-SVID ID = %s, want %s", svid.ID, id)
	}
	if svid.Hint != hint {
		t.Fatalf("WIT-SVID hint = %q, want %q", svid.Hint, hint)
	}
	valid, err := witsvid.ParseAndValidate(svid.Marshal(), bundles)
	if err != nil {
		t.Fatalf("witsvid.ParseAndValidate: %v", err)
	}
	if valid.ID != id || valid.KeyID == "" {
		t.Fatalf("validated WIT-SVID: ID %s, kid %q", valid.ID, valid.KeyID)
	}
	// The private key the agent handed out belongs to the cnf key.
	priv, ok := svid.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		t.Fatalf("WIT-SVID private key is %T, want *ecdsa.PrivateKey", svid.PrivateKey)
	}
	if !priv.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(valid.PublicKey) {
		t.Fatal("the WIT-SVID's private key does not match its cnf.jwk")
	}
	tok, err := jwt.ParseSigned(svid.Marshal(), []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatalf("jwt.ParseSigned: %v", err)
	}
	if typ := tok.Headers[0].ExtraHeaders[jose.HeaderType]; typ != "wit+jwt" {
		t.Fatalf("typ = %v, want wit+jwt", typ)
	}
	var claims map[string]any
	if err := tok.UnsafeClaimsWithoutVerification(&claims); err != nil {
		t.Fatal(err)
	}
	if _, ok := claims["aud"]; ok {
		t.Fatal("a WIT-SVID must not carry aud")
	}
	cnf, _ := claims["cnf"].(map[string]any)
	jwk, _ := cnf["jwk"].(map[string]any)
	if jwk["alg"] != "ES256" || jwk["d"] != nil {
		t.Fatalf("cnf.jwk = %v, want a public ES256 key", jwk)
	}
	if life := time.Until(valid.Expiry); life <= 0 || life > witTTL+clockSlack {
		t.Fatalf("WIT-SVID expires in %s, want within the %s TTL", life, witTTL)
	}
	return valid
}

func TestFetchWITSVIDAndBundlesValidateWithGoSpiffe(t *testing.T) {
	c := witClient(t)
	id := expectedID(t)
	svid, err := c.FetchWITSVID(timeout(t), "")
	if err != nil {
		t.Fatalf("FetchWITSVID: %v", err)
	}
	bundles, err := c.FetchWITBundles(timeout(t))
	if err != nil {
		t.Fatalf("FetchWITBundles: %v", err)
	}
	if !bundles.Has(id.TrustDomain()) {
		t.Fatalf("WIT bundles lack %s", id.TrustDomain())
	}
	checkWITSVID(t, svid, bundles)

	// Asking for the caller's own ID gives the same; another ID is refused.
	byID, err := c.FetchWITSVID(timeout(t), id.String())
	if err != nil || byID.ID != id {
		t.Fatalf("FetchWITSVID(%s) = %v, %v", id, byID, err)
	}
	if _, err := c.FetchWITSVID(timeout(t), "spiffe://example.org/someone-else"); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("FetchWITSVID(another ID) = %v, want PermissionDenied", err)
	}

	// WIT-SVID keys and JWT-SVID keys are apart: neither token passes as
	// the other.
	jwtBundles, err := c.FetchJWTBundles(timeout(t))
	if err != nil {
		t.Fatalf("FetchJWTBundles: %v", err)
	}
	if _, err := jwtsvid.ParseAndValidate(svid.Marshal(), jwtBundles, []string{audience}); err == nil {
		t.Fatal("a WIT-SVID validated as a JWT-SVID")
	}
	jsvid, err := c.FetchJWTSVID(timeout(t), jwtsvid.Params{Audience: audience})
	if err != nil {
		t.Fatalf("FetchJWTSVID: %v", err)
	}
	if _, err := witsvid.ParseAndValidate(jsvid.Marshal(), bundles); err == nil {
		t.Fatal("a JWT-SVID validated as a WIT-SVID")
	}
	for _, b := range jwtBundles.Bundles() {
		for kid := range b.JWTAuthorities() {
			if wb, ok := bundles.Get(b.TrustDomain()); ok && wb.HasWITAuthority(kid) {
				t.Fatalf("key %s is both a JWT-SVID and a WIT-SVID key", kid)
			}
		}
	}
}

// A proof of possession made with the handed-out key verifies with the cnf
// key go-spiffe read from the validated WIT-SVID, and not with another.
func TestWITSVIDKeyProvesPossession(t *testing.T) {
	c := witClient(t)
	svid, err := c.FetchWITSVID(timeout(t), "")
	if err != nil {
		t.Fatalf("FetchWITSVID: %v", err)
	}
	bundles, err := c.FetchWITBundles(timeout(t))
	if err != nil {
		t.Fatalf("FetchWITBundles: %v", err)
	}
	valid := checkWITSVID(t, svid, bundles)
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: svid.PrivateKey},
		(&jose.SignerOptions{}).WithType("wpt+jwt"))
	if err != nil {
		t.Fatal(err)
	}
	wpt, err := jwt.Signed(signer).Claims(map[string]any{
		"aud": "https://resource.example/path",
		"exp": time.Now().Add(30 * time.Second).Unix(),
		"jti": "interop-1",
	}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := jwt.ParseSigned(wpt, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatal(err)
	}
	var out map[string]any
	if err := parsed.Claims(valid.PublicKey, &out); err != nil {
		t.Fatalf("proof does not verify with the cnf key: %v", err)
	}
}

// The agent's raw bundle map: keyed by the trust domain's SPIFFE ID, each
// key with a kid and use wit-svid.
func TestRawWITBundles(t *testing.T) {
	id := expectedID(t)
	c := rawClient(t)
	ctx, cancel := context.WithTimeout(withHeader(context.Background()), callTimeout)
	defer cancel()
	s, err := c.FetchWITBundles(ctx, &workload.WITBundlesRequest{})
	if err != nil {
		t.Fatalf("FetchWITBundles: %v", err)
	}
	r, err := s.Recv()
	if err != nil {
		t.Fatalf("FetchWITBundles recv: %v", err)
	}
	doc, ok := r.Bundles[id.TrustDomain().IDString()]
	if !ok || len(r.Bundles) != 1 {
		t.Fatalf("WIT bundle keys = %v", r.Bundles)
	}
	var jwks struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal([]byte(doc), &jwks); err != nil {
		t.Fatal(err)
	}
	if len(jwks.Keys) == 0 {
		t.Fatal("no WIT-SVID keys")
	}
	for _, k := range jwks.Keys {
		if k["use"] != "wit-svid" || k["kid"] == nil || k["d"] != nil {
			t.Fatalf("WIT bundle key %v", k)
		}
	}
	// Without the security header the agent refuses, as for every RPC.
	s2, err := c.FetchWITSVID(context.Background(), &workload.WITSVIDRequest{})
	if err == nil {
		_, err = s2.Recv()
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("FetchWITSVID without the header = %v, want InvalidArgument", err)
	}
}

type witWatcher struct {
	svids   chan []*witsvid.SVID
	bundles chan *witbundle.Set
	errs    chan error
}

func (w *witWatcher) OnWITSVIDsUpdate(s []*witsvid.SVID) {
	select {
	case w.svids <- s:
	default:
	}
}

func (w *witWatcher) OnWITBundlesUpdate(b *witbundle.Set) {
	select {
	case w.bundles <- b:
	default:
	}
}

func (w *witWatcher) report(err error) {
	if status.Code(err) == codes.Canceled || errors.Is(err, context.Canceled) {
		return
	}
	select {
	case w.errs <- err:
	default:
	}
}

func (w *witWatcher) OnWITSVIDsWatchError(err error)   { w.report(err) }
func (w *witWatcher) OnWITBundlesWatchError(err error) { w.report(err) }

func TestWatchWITSVIDsSeesRotation(t *testing.T) {
	c := witClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout+5*time.Second)
	defer cancel()
	w := &witWatcher{svids: make(chan []*witsvid.SVID, 16), bundles: make(chan *witbundle.Set, 16), errs: make(chan error, 16)}
	go func() { _ = c.WatchWITSVIDs(ctx, w, "") }()
	go func() { _ = c.WatchWITBundles(ctx, w) }()

	var bundles *witbundle.Set
	select {
	case bundles = <-w.bundles:
	case err := <-w.errs:
		t.Fatalf("watch error: %v", err)
	case <-time.After(callTimeout):
		t.Fatal("no WIT bundles from WatchWITBundles")
	}
	deadline := time.After(callTimeout)
	var first *witsvid.SVID
	var firstAt time.Time
	for {
		select {
		case svids := <-w.svids:
			if len(svids) != 1 {
				t.Fatalf("update with %d WIT-SVIDs", len(svids))
			}
			valid := checkWITSVID(t, svids[0], bundles)
			if first == nil {
				first, firstAt = valid, time.Now()
				continue
			}
			if valid.Marshal() == first.Marshal() {
				continue
			}
			if !valid.Expiry.After(first.Expiry) {
				t.Fatalf("rotated expiry %s not after %s", valid.Expiry, first.Expiry)
			}
			if valid.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(first.PublicKey) {
				t.Fatal("a rotated WIT-SVID binds the same key: it must come with a new one")
			}
			if waited := time.Since(firstAt); waited >= witTTL {
				t.Fatalf("rotation took %s, not before the %s TTL ran out", waited, witTTL)
			}
			return
		case err := <-w.errs:
			t.Fatalf("watch error: %v", err)
		case <-deadline:
			if first == nil {
				t.Fatalf("no WIT-SVID within %s", callTimeout)
			}
			t.Fatalf("no rotated WIT-SVID within %s", callTimeout)
		}
	}
}

// guardServer starts token-guard's WIT example server (TESSERA_WIT_GUARD_BIN,
// built by run.sh) trusting the WIT bundle the agent serves; returns its
// base URL.
func guardServer(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("TESSERA_WIT_GUARD_BIN")
	if bin == "" {
		t.Fatal("TESSERA_WIT_GUARD_BIN is not set: run this suite through tests/interop/go/run.sh, which builds token-guard's wit_guard_server example")
	}
	id := expectedID(t)
	c := rawClient(t)
	ctx, cancel := context.WithTimeout(withHeader(context.Background()), callTimeout)
	defer cancel()
	s, err := c.FetchWITBundles(ctx, &workload.WITBundlesRequest{})
	if err != nil {
		t.Fatalf("FetchWITBundles: %v", err)
	}
	r, err := s.Recv()
	if err != nil {
		t.Fatalf("FetchWITBundles recv: %v", err)
	}
	jwks := filepath.Join(t.TempDir(), "wit.jwks")
	if err := os.WriteFile(jwks, []byte(r.Bundles[id.TrustDomain().IDString()]), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--trust-domain", id.TrustDomain().Name(), "--jwks-file", jwks)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("wit_guard_server printed no address: %v", err)
	}
	return strings.TrimSpace(line)
}

func tokenHash(s string) string {
	h := sha256.Sum256([]byte(s))
	return base64.RawURLEncoding.EncodeToString(h[:])
}

// wpt signs a Workload Proof Token with go-jose (draft-ietf-wimse-wpt).
func wpt(t *testing.T, key crypto.Signer, claims map[string]any) string {
	t.Helper()
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key},
		(&jose.SignerOptions{}).WithType("wpt+jwt"))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jwt.Signed(signer).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func randomJTI(t *testing.T) string {
	t.Helper()
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

// call sends GET base+path with headers; returns the status, the
// WWW-Authenticate header and the body.
func call(t *testing.T, url string, headers map[string]string) (int, string, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header.Get("WWW-Authenticate"), string(body)
}

// A WIT-SVID fetched with go-spiffe and a WPT signed by go-jose with the
// handed-out key are accepted by token-guard's WitGuardLayer; tampered,
// replayed, expired, over-long, wrong-key, wrong-audience and unbound
// proofs are refused with 401 and a WPT challenge, and a WIT-SVID alone
// (as a bearer token) authenticates nothing.
func TestTokenGuardAcceptsOnlyAProofOfPossession(t *testing.T) {
	c := witClient(t)
	id := expectedID(t)
	base := guardServer(t)
	svid, err := c.FetchWITSVID(timeout(t), "")
	if err != nil {
		t.Fatalf("FetchWITSVID: %v", err)
	}
	wit := svid.Marshal()
	key, ok := svid.PrivateKey.(crypto.Signer)
	if !ok {
		t.Fatalf("WIT-SVID private key is %T", svid.PrivateKey)
	}
	const path = "/orders/42"
	claims := func(mod func(map[string]any)) map[string]any {
		m := map[string]any{
			"aud": base + path,
			"exp": time.Now().Add(30 * time.Second).Unix(),
			"jti": randomJTI(t),
			"wth": tokenHash(wit),
		}
		if mod != nil {
			mod(m)
		}
		return m
	}
	send := func(name string, wantStatus int, headers map[string]string) string {
		t.Helper()
		status, challenge, body := call(t, base+path+"?page=2", headers)
		if status != wantStatus {
			t.Fatalf("%s: status %d (%s), want %d", name, status, body, wantStatus)
		}
		if status == http.StatusUnauthorized && challenge != "WPT" {
			t.Fatalf("%s: WWW-Authenticate %q, want WPT", name, challenge)
		}
		if strings.Contains(body, wit) || strings.Contains(body, headers["Authorization"]) && headers["Authorization"] != "" {
			t.Fatalf("%s: the response echoes a token", name)
		}
		return body
	}
	withWPT := func(proof string) map[string]string {
		return map[string]string{"Workload-Identity-Token": wit, "Authorization": "WPT " + proof}
	}

	good := wpt(t, key, claims(nil))
	body := send("valid proof", http.StatusOK, withWPT(good))
	var who struct {
		SpiffeID string `json:"spiffe_id"`
	}
	if err := json.Unmarshal([]byte(body), &who); err != nil || who.SpiffeID != id.String() {
		t.Fatalf("guard saw %q (%v), want %s", body, err, id)
	}
	send("replayed proof", http.StatusUnauthorized, withWPT(good))

	// A WIT-SVID whose signature was altered.
	parts := strings.Split(wit, ".")
	sig := []byte(parts[2])
	if sig[5] == 'A' {
		sig[5] = 'B'
	} else {
		sig[5] = 'A'
	}
	tampered := parts[0] + "." + parts[1] + "." + string(sig)
	send("tampered WIT", http.StatusUnauthorized, map[string]string{
		"Workload-Identity-Token": tampered,
		"Authorization":           "WPT " + wpt(t, key, claims(func(m map[string]any) { m["wth"] = tokenHash(tampered) })),
	})
	send("expired proof", http.StatusUnauthorized, withWPT(wpt(t, key, claims(func(m map[string]any) {
		m["exp"] = time.Now().Add(-time.Minute).Unix()
	}))))
	send("proof valid too long", http.StatusUnauthorized, withWPT(wpt(t, key, claims(func(m map[string]any) {
		m["exp"] = time.Now().Add(time.Hour).Unix()
	}))))
	other, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	send("proof signed with another key", http.StatusUnauthorized, withWPT(wpt(t, other, claims(nil))))
	send("proof for another resource", http.StatusUnauthorized, withWPT(wpt(t, key, claims(func(m map[string]any) {
		m["aud"] = base + "/orders/43"
	}))))
	send("proof for another WIT", http.StatusUnauthorized, withWPT(wpt(t, key, claims(func(m map[string]any) {
		m["wth"] = tokenHash(wit + "x")
	}))))
	send("proof without jti", http.StatusUnauthorized, withWPT(wpt(t, key, claims(func(m map[string]any) {
		delete(m, "jti")
	}))))
	send("no proof", http.StatusUnauthorized, map[string]string{"Workload-Identity-Token": wit})
	send("WIT-SVID as a bearer token", http.StatusUnauthorized, map[string]string{"Authorization": "Bearer " + wit})

	// A Txn-Token beside it must be bound by tth, and is then accepted.
	txn := "eyJ0eXAiOiJ0eG4rand0In0.e30.c2ln"
	bound := withWPT(wpt(t, key, claims(func(m map[string]any) { m["tth"] = tokenHash(txn) })))
	bound["Txn-Token"] = txn
	send("Txn-Token bound by tth", http.StatusOK, bound)
	unbound := withWPT(wpt(t, key, claims(nil)))
	unbound["Txn-Token"] = txn
	send("Txn-Token not bound", http.StatusUnauthorized, unbound)

	// Drafts -00/-01: the WPT in Workload-Proof-Token, a bearer access token
	// in Authorization bound by ath.
	access := "an-access-token"
	send("draft -01 form with ath", http.StatusOK, map[string]string{
		"Workload-Identity-Token": wit,
		"Workload-Proof-Token":    wpt(t, key, claims(func(m map[string]any) { m["ath"] = tokenHash(access) })),
		"Authorization":           "Bearer " + access,
	})
	send("draft -01 form without ath", http.StatusUnauthorized, map[string]string{
		"Workload-Identity-Token": wit,
		"Workload-Proof-Token":    wpt(t, key, claims(nil)),
		"Authorization":           "Bearer " + access,
	})
}
